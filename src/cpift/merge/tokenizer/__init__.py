"""Tokenizers of merges (mergekit's ``tokenizer_source``, ``tokenizer:`` and ``chat_template``): the
output vocabulary (vocab.py), the embedding rows remapped onto it (rows.py), the chat template
(template.py), and the set-up a config run calls (prepare.py)."""
