"""Data as files and records: no model, no Ray. `jsonl.py` is the one JSON-lines reader (file:line errors);
`questions.py` the multiple-choice question type and its parsing; `instruct.py` instruction data (Alpaca, ShareGPT)
tokenized with its loss mask; `passages.py` plain-text passage sets; `restoring.py` the restoring-set selection
(pool ranking, token budget); `rehearsal.py` the replayed sample; `hub.py` hub-hosted datasets (`hf:REPO...`).
"""
