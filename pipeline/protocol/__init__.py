"""The NLA protocol as data: the verbalizer prompt, injection and decoding rules."""
