"""Peers for `python -m bench.compare`, each a program of its own started by `procs.PeerProcess`: the same model,
tokenizer and ORT settings behind other stacks (`naive_server`, `ray_peer`), and no model (`canned_server`)."""
