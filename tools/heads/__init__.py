"""Head lifecycle tools: list, train, merge, replace and remove heads on a frozen shared bottom.

See `python -m tools.heads --help`. Modules: `graph_edit` (head surgery, bottom comparison),
`edit` (merge/remove/export), `verify` (bit-identity checks), `data`, `features` (cached
bottom features), `train` (numpy head training), `new_head` (the `train` command). Its benchmark is
`python -m bench.heads`.
"""
