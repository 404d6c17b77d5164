"""The inputs: SFT records from files or the built-in sets, chat-template tokenization, the tokenized splits, GSM8K answers."""
