"""Training: data preparation in OLMo's layout, and fine-tuning."""
