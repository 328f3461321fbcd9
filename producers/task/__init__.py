"""The trainer's task code: the base model, tokenizer and adapter (``model``, ``tokenizer``), the
classifier's data, labels, prompts, encoding and metrics (``data``, ``labels``, ``encoding``,
``evaluation``, ``metrics``, ``sampledata``) and chat fine-tuning (``chat``, ``chatdata``).

The predictor and `trainbus export` use this package too, so that serving equals evaluation; it
knows nothing of the bus."""
