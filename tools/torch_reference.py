"""A PyTorch reference of the whole served model, as the repository contract defines it, and its export.

    features = pooled ERNIE([CLS] query [SEP] title [SEP]) ⊕ site[site_id] ⊕ mean(ner[ner_ids ≠ 0]) ⊕ industry[id]
    score_i  = sigmoid(Linear(h, 1)(ReLU(Linear(D, h)(features))))   for each head i

Row 0 of every look-up table is "missing" and embeds to exact zeros; row 1 is `[UNK]`. `export` writes what
`python -m tools.build_model --from-hf CKPT --lookups DIR --heads-state-dict FILE --heads-meta FILE` reads,
with every trained parameter (model_repo/README.md, "Importing a trained model"; the worked example is
tests/test_train_to_serve.py). Needs torch and transformers (requirements-parity.txt); building and serving
never import this module.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from model_format.manifest import Head
from tools.build_model.lookups import write_lookups
from tools.build_model.weights import LookupTables
from tools.build_model.writer import LookupVocabs


class ScoringModel(nn.Module):  # type: ignore[misc, unused-ignore]  # Any where torch is absent
    def __init__(self, encoder: Any, vocabs: LookupVocabs, dims: tuple[int, int, int], heads: int,
                 head_hidden: int) -> None:
        super().__init__()
        self.encoder = encoder  # transformers.ErnieModel (or BertModel): its pooled output
        self.vocabs = vocabs
        site_rows, ner_rows, industry_rows = vocabs.sizes
        self.site = nn.Embedding(site_rows, dims[0], padding_idx=0)
        self.ner = nn.Embedding(ner_rows, dims[1], padding_idx=0)
        self.industry = nn.Embedding(industry_rows, dims[2], padding_idx=0)
        width = int(encoder.config.hidden_size) + sum(dims)
        self.heads = nn.ModuleList(
            nn.Sequential(nn.Linear(width, head_hidden), nn.ReLU(), nn.Linear(head_hidden, 1)) for _ in range(heads))

    def features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor,
                 site_id: torch.Tensor, ner_ids: torch.Tensor, industry_id: torch.Tensor) -> torch.Tensor:
        pooled = self.encoder(input_ids=input_ids, attention_mask=attention_mask,
                              token_type_ids=token_type_ids).pooler_output
        present = (ner_ids != 0).unsqueeze(-1).float()
        ner = (self.ner(ner_ids) * present).sum(1) / present.sum(1).clamp(min=1.0)
        return torch.cat([pooled, self.site(site_id), ner, self.industry(industry_id)], dim=-1)

    def forward(self, **inputs: torch.Tensor) -> torch.Tensor:
        features = self.features(**inputs)
        return torch.sigmoid(torch.cat([head(features) for head in self.heads], dim=-1))


def train_steps(model: ScoringModel, batches: Sequence[tuple[dict[str, torch.Tensor], torch.Tensor]],
                lr: float = 1e-3) -> list[float]:
    """One Adam step per batch on binary cross-entropy against `labels` [B, N]; the losses."""
    optimiser = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    losses = []
    for inputs, labels in batches:
        optimiser.zero_grad()
        loss = nn.functional.binary_cross_entropy(model(**inputs), labels)
        loss.backward()  # type: ignore[no-untyped-call, unused-ignore]
        optimiser.step()
        with torch.no_grad():  # keep the contract: a missing value embeds to exact zeros
            for table in (model.site, model.ner, model.industry):
                table.weight[0].zero_()
        losses.append(float(loss.detach()))
    model.eval()
    return losses


def export(model: ScoringModel, heads: Sequence[Head], vocab_txt: Path, out: Path, *,
           do_lower_case: bool = True) -> dict[str, Path]:
    """The builder's inputs: a Hugging Face checkpoint folder, the look-up tables, the heads and their
    metadata. Returns the paths by flag name."""
    ckpt, lookups = out / "checkpoint", out / "lookups"
    model.encoder.save_pretrained(str(ckpt))
    shutil.copy(vocab_txt, ckpt / "vocab.txt")
    (ckpt / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": do_lower_case}), encoding="utf-8")
    tables = LookupTables(*(t.weight.detach().numpy().copy() for t in (model.site, model.ner, model.industry)))
    write_lookups(lookups, model.vocabs, tables)
    state = {f"heads.{k}": v.detach().contiguous() for k, v in model.heads.state_dict().items()}
    save_file(state, str(out / "heads.safetensors"))
    meta = [{"srcid": h.srcid, "name": h.name, "threshold": h.threshold} for h in heads]
    (out / "heads.json").write_text(json.dumps(meta, ensure_ascii=False), encoding="utf-8")
    return {"from_hf": ckpt, "lookups": lookups, "heads_state_dict": out / "heads.safetensors",
            "heads_meta": out / "heads.json"}
