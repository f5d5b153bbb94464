"""ECG vision-language models: rendering, text targets, tokenizers, distillation."""
