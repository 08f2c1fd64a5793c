"""The inference layer: sampling options, engines, generate/stream_generate and the Generation record, the
compiled decoder, chat sessions and batch jobs."""
