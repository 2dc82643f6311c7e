"""Loading models: the tokenizer, the base trunk, the verbalizer, the reconstructor, the tiny offline models."""
