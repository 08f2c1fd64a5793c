"""The model layer: sizes, checkpoint revisions, the chat template and message checks, loading, tiny checkpoints."""
