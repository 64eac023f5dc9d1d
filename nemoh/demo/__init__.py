"""The demo model's data: a synthetic IT-helpdesk tool-use corpus and its byte-level BPE tokenizer."""
