"""The frozen teacher behind a small interface: kept tokens in, teacher targets out.

The online teacher runs a causal LM and hands over final hidden states plus its LM-head weight
(the loss applies the head chunk by chunk, see essence.loss.fused). The cached teacher reads
sparse targets (top-k + tail, or samples) from a teacher cache (essence.teacher.cache_format) and never
loads or runs the teacher; the loss then takes the sparse path (essence.loss.sparse_kd).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from essence.errors import EssenceError
from essence.loss.sparse_kd import SparseTargets, narrow_topk
from essence.models.sharding import full_weight


@dataclass
class TeacherOutput:
    """hidden: [batch, seq, hidden] final hidden states; head: [vocab, hidden] LM-head weight;
    or sparse: targets per position [batch, seq, k] (a cached teacher; hidden and head None)."""

    hidden: torch.Tensor | None
    head: torch.Tensor | None
    sparse: SparseTargets | None = None


class Teacher(Protocol):
    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 record_ids: list[str] | None = None) -> TeacherOutput: ...


class OnlineTeacher:
    """A causal LM run forward on the fly: frozen, eval mode, no grad, its own dtype."""

    def __init__(self, model: torch.nn.Module, device: torch.device):
        self.model = model.to(device).eval()
        self.model.requires_grad_(False)
        self.device = device

    @torch.no_grad()
    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 record_ids: list[str] | None = None,
                 position_ids: torch.Tensor | None = None) -> TeacherOutput:
        """position_ids: a packed batch's restarting positions (then no 2-D mask is passed and
        attention stays within each sequence, as in essence.train.step). Under FSDP2 the head is
        gathered whole for this micro-batch (essence.models.sharding)."""
        body = self.model.get_decoder()
        packed = position_ids is not None
        out = body(input_ids=input_ids.to(self.device),
                   attention_mask=None if packed else attention_mask.to(self.device),
                   position_ids=position_ids.to(self.device) if packed else None, use_cache=False)
        return TeacherOutput(out.last_hidden_state, full_weight(self.model.get_output_embeddings().weight))

    def summary(self) -> dict:
        """What a run's summary says about its teacher."""
        return {"teacher_source": "online", "teacher_context": "kept"}


def check_vocabularies(tokenizer, model_tokenizer, model_name: str, role: str = "teacher") -> None:
    """Refuse a model (teacher or student) whose own tokenizer maps tokens to other ids than the
    run's tokenizer: it would train on, or score, the wrong ids."""
    if model_tokenizer is None:
        return
    vocab = tokenizer.get_vocab()
    model_vocab = model_tokenizer.get_vocab()
    if vocab == model_vocab:
        return
    differing = [t for t, i in vocab.items() if model_vocab.get(t) != i]
    sample = ", ".join(repr(t) for t in differing[:3])
    fix = ("pick a teacher from the student's model family" if role == "teacher" else
           "set model.tokenizer to the student's own tokenizer (or leave it empty)")
    raise EssenceError(
        f"the {role} {model_name!r} and model.tokenizer use different vocabularies "
        f"({len(model_vocab)} vs {len(vocab)} tokens; {len(differing)} tokens differ, "
        f"e.g. {sample}); token-level distillation needs one shared tokenizer — {fix}"
    )


class CachedTeacher:
    """The teacher's sparse targets read from a teacher cache: nothing is loaded or run.

    bind() checks the cache against the experiment once, before training (fingerprint, settings,
    every record the run uses), and learns which cache row serves each kept token: the target of
    kept token p is the original token j = kept[p + 1], and cache row j − 1 is the teacher's
    distribution over it given every original token before it. For lead spans that is exactly
    what an online teacher sees; for windows and cot_lead the teacher saw the full context
    (model.teacher_context: full).
    """

    def __init__(self, config, device: torch.device):
        self.config, self.device = config, device
        self.reader = None  # opened by bind(), which knows the experiment's fingerprint
        self.positions: dict[str, torch.Tensor] = {}
        self.skipped: list[str] = []

    def _open(self, expected: dict[str, str]) -> None:
        """Find the experiment's cache, refuse one built for other settings or another experiment."""
        from essence.teacher.cache_build import cache_settings
        from essence.teacher.cache_format import (
            CacheReader,
            describe_differences,
            resolve_cache_dir,
        )

        root = self.config.model.teacher_cache
        found = resolve_cache_dir(root, expected)
        if found is None:
            raise EssenceError(f"model.teacher_cache={root} holds no teacher cache for this experiment "
                               "(no manifest.json there or in a fingerprint folder); build it with "
                               f"essence teacher cache CONFIG --out {root}")
        reader = CacheReader(found)
        if self.config.model.teacher is None and self.config.model.teacher_init is None:
            expected = {**expected, "teacher": reader.fingerprint.get("teacher")}  # the cache names it
        diffs = describe_differences(expected, reader.fingerprint)
        if diffs:
            raise EssenceError(f"the teacher cache {found} was built for another experiment: "
                               f"{'; '.join(diffs)}. Rebuild it (essence teacher cache CONFIG --out "
                               "DIR) or point model.teacher_cache at a matching one")
        wanted, have = cache_settings(self.config, reader.vocab), reader.settings
        if have.mode == "topk":
            self.k = min(wanted.k, have.k)
            ok = (wanted.mode == "topk" and (have.k >= wanted.k or have.k == reader.vocab)
                  and have.temperature == wanted.temperature)
        else:
            self.k = have.k
            ok = wanted.mode == "sampled" and have.k == wanted.k and have.temperature == wanted.temperature
        if not ok:
            raise EssenceError(
                f"teacher cache {found} holds {have.mode} k={have.k} (τ={have.temperature}) but "
                f"the experiment asks for {wanted.mode} k={wanted.k} (τ={wanted.temperature}); set "
                "model.teacher_cache_k / teacher_cache_mode / loss.temperature to match, or rebuild")
        self.reader = reader

    def bind(self, tokenizer, prepared, train_set: list, val_set: list) -> tuple[list, list]:
        """Open and check the cache and every record the run uses; returns the sets without the
        records skipped under data.on_error: skip (not in the cache). A damaged shard is refused
        whatever data.on_error says: it is the cache that is broken, not the data."""
        from essence.teacher.cache_format import fingerprint, token_digest

        self._open(fingerprint(self.config, tokenizer, prepared.rendered))
        by_id = {r.record_id: (r, kept) for r, kept in zip(prepared.rendered, prepared.kept)}
        val_ids = {e.record_id for e in val_set}

        def usable(example) -> bool:
            rendered, kept = by_id[example.record_id]
            problem = self.reader.problem(example.record_id, token_digest(rendered.input_ids))
            if problem is not None:
                if "tokens differ" in problem or self.config.data.on_error == "fail":
                    raise EssenceError(f"{problem}; rebuild the cache, or set data.on_error: skip "
                                       "to train without the records it lacks")
                self.skipped.append(problem)
                return False
            n = len(rendered.input_ids)
            index = range(n) if example.record_id in val_ids else kept.indices()
            self.positions[example.record_id] = torch.tensor(list(index), dtype=torch.long)
            return True

        train_set = [e for e in train_set if usable(e)]
        val_set = [e for e in val_set if usable(e)]
        if self.skipped:
            print(f"essence: skipped {len(self.skipped)} records the teacher cache cannot serve, "
                  f"e.g. {self.skipped[0]}")
        return train_set, val_set

    def _rows(self, record_id: str) -> tuple[torch.Tensor, ...]:
        """The cached targets of a bound record's kept targets: ids, logp [t, k], tail/weights."""
        t = self.reader.read(record_id)
        rows = self.positions[record_id][1:] - 1
        ids = torch.from_numpy(t.ids.astype("int64"))[rows]
        logp = torch.from_numpy(t.logp.astype("float32"))[rows]
        if t.counts is not None:
            counts = torch.from_numpy(t.counts.astype("float32"))[rows]
            return ids, logp, None, counts / counts.sum(1, keepdim=True).clamp(min=1)
        tail = torch.from_numpy(t.tail.astype("float32"))[rows]
        return (*narrow_topk(ids, logp, tail, self.k), None)  # a larger cache serves a smaller k

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 record_ids: list[str] | None = None) -> TeacherOutput:
        assert record_ids is not None, "a cached teacher needs the batch's record ids"
        b, t = input_ids.shape
        sampled = self.reader.settings.mode == "sampled"
        ids = torch.zeros(b, t, self.k, dtype=torch.long)
        logp = torch.zeros(b, t, self.k)
        extra = torch.zeros(b, t, self.k) if sampled else torch.zeros(b, t)
        lengths = attention_mask.sum(1).tolist()
        for row, record_id in enumerate(record_ids):
            assert len(self.positions[record_id]) == lengths[row], f"record {record_id}: kept length"
            r_ids, r_logp, r_tail, r_weights = self._rows(record_id)
            n = r_ids.shape[0]
            ids[row, :n], logp[row, :n] = r_ids, r_logp
            extra[row, :n] = r_weights if sampled else r_tail
        move = lambda x: x.to(self.device)  # noqa: E731
        sparse = SparseTargets(move(ids), move(logp), None if sampled else move(extra),
                               move(extra) if sampled else None, self.reader.settings.temperature)
        return TeacherOutput(None, None, sparse)

    def flop_model(self):
        """The cached teacher's FLOPs model (what running it online would cost)."""
        from essence.models.flops import FlopModel

        t = self.reader.manifest["teacher"]
        return FlopModel(params=t["params"], head=t["head"], layers=t["layers"], attn_dim=t["attn_dim"])

    def summary(self) -> dict:
        """What a run's summary says about its teacher (the cache's one-off pass included)."""
        from essence.teacher.cache_format import fingerprint_key

        built = self.reader.manifest["teacher_pass"]
        return {"teacher_source": "cache", "teacher_ran": False,
                "teacher_context": self.config.model.teacher_context,
                "teacher_cache": str(self.reader.dir),
                "teacher_cache_key": fingerprint_key(self.reader.fingerprint),
                "teacher_cache_flops": built["flops"], "teacher_cache_wall_time_s": built["wall_time_s"],
                "teacher_cache_k": self.k, "teacher_cache_skipped": len(self.skipped)}
