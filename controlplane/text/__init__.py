"""Text in and out of token ids: the model's tokenizer and chat template (``tokenizer``), the
incremental detokenizer (``detokenizer``) and stop strings (``stop``)."""
