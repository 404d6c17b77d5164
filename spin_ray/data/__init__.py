"""The inputs: SFT records from files or built-in sets, chat-template tokenization, tokenized splits, GSM8K answers."""
