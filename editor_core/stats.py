"""Key statistics: E[k k^T] of the inputs of MLP output projections over ordinary text.

The locate-then-edit methods (ROME, MEMIT, AlphaEdit) weight an edit's key by these statistics so
that the update changes the layer's output as little as possible for the keys the model already
uses. ``k`` is the input of ``down_proj`` (``c_proj`` for GPT-2, ``fc_out`` for GPT-J) at one token.

A :class:`KeyStats` is one safetensors file: ``U.<layer>``, the upper triangle (row by row, diagonal
included) of the (d_in, d_in) uncentred second moment of each layer (mean over tokens, fp32 in
memory; stored fp16 where it fits, to keep the shipped file small; the moment is symmetric, so half
of it is all there is to store; files written before hold the full matrix as ``C.<layer>``), with the
model fingerprint (exact, and bf16-rounded so a bf16 load of the same model accepts them), the token
count and a description of the corpus in the metadata. ``F.<layer>`` (fp32 upper triangles, optional) is
the Fisher of ordinary text at a value layer (:mod:`editor_core.methods.value_metric`), the metric the
value search may measure its steps in; ``fisher_tokens`` in the metadata is how many positions it averages.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm import tqdm

from editor_core.targets import Target, out_proj_targets

log = logging.getLogger(__name__)

STATS_FILE = "keystats.safetensors"


class StatsError(ValueError):
    """Statistics missing, unreadable or made for another model."""


@dataclass
class KeyStats:
    """Second moments of the output-projection inputs of some layers of one model."""

    moments: dict[int, torch.Tensor]  # layer -> (d_in, d_in) fp32, E[k k^T]
    tokens: int  # tokens averaged over
    corpus: str  # what text they came from
    fingerprint: str  # editor_core.fingerprint.model_fingerprint of the out-proj targets
    extra: dict = field(default_factory=dict)
    weights_fingerprint: str = ""  # editor_core.fingerprint.weights_fingerprint of them ("" in older files)
    fisher: dict[int, torch.Tensor] = field(default_factory=dict)  # value layer -> (d, d) fp32 Fisher
    fisher_tokens: int = 0  # positions the Fisher averages over

    @property
    def layers(self) -> list[int]:
        return sorted(self.moments)

    def fits(self, model: nn.Module) -> bool:
        """Whether these statistics were made on ``model``'s weights: the exact fingerprint of its
        out-projections, or the bf16-rounded one (the same checkpoint loaded in another dtype)."""
        if self.fingerprint == stats_fingerprint(model, self.layers):
            return True
        return bool(self.weights_fingerprint) and self.weights_fingerprint == stats_weights_fingerprint(
            model, self.layers)

    def save(self, path: str | Path, dtype: torch.dtype = torch.float16) -> Path:
        """Write as safetensors (``dtype`` storage) with JSON metadata."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {f"U.{layer}": _stored(layer, _upper(c), dtype) for layer, c in self.moments.items()}
        # the Fisher's entries span 1e-7..1e-2 (fp16 would flush the small ones); a value layer's is small
        tensors.update({f"F.{layer}": _upper(f).float().contiguous() for layer, f in self.fisher.items()})
        meta = {"tokens": str(self.tokens), "corpus": self.corpus, "fingerprint": self.fingerprint,
                "extra": json.dumps(self.extra, sort_keys=True)}
        if self.fisher:
            meta["fisher_tokens"] = str(self.fisher_tokens)
        if self.weights_fingerprint:
            meta["weights_fingerprint"] = self.weights_fingerprint
        save_file(tensors, str(path), metadata=meta)
        path.chmod(0o644)  # safetensors writes 0600; a service running as another user must read it
        return path

    @classmethod
    def load(cls, path: str | Path, expected_fingerprint: str | None = None,
             expected_weights_fingerprint: str | None = None) -> KeyStats:
        """Read a file written by :meth:`save`; refuse statistics of another model.

        With expectations given, the file must carry the expected exact fingerprint or the expected
        bf16-rounded one (:func:`stats_fingerprint`, :func:`stats_weights_fingerprint`).
        """
        path = Path(path)
        if not path.is_file():
            raise StatsError(f"no key statistics at {path}: compute them with `mend stats`")
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        expected = {"fingerprint": expected_fingerprint, "weights_fingerprint": expected_weights_fingerprint}
        expected = {k: v for k, v in expected.items() if v is not None}
        if expected and not any(meta.get(k) == v for k, v in expected.items()):
            mine = expected.get("fingerprint") or expected["weights_fingerprint"]
            raise StatsError(f"key statistics at {path} were computed for another model "
                             f"({meta.get('fingerprint', '?')[:12]}..., this one is {mine[:12]}...)")
        tensors = load_file(str(path))
        moments = {int(k.split(".", 1)[1]): v.float() for k, v in tensors.items() if k.startswith("C.")}
        moments.update({int(k.split(".", 1)[1]): _from_upper(v.float()) for k, v in tensors.items()
                        if k.startswith("U.")})
        fisher = {int(k.split(".", 1)[1]): _from_upper(v.float()) for k, v in tensors.items() if k.startswith("F.")}
        return cls(moments, int(meta.get("tokens", 0)), meta.get("corpus", ""), meta.get("fingerprint", ""),
                   json.loads(meta.get("extra", "{}")), meta.get("weights_fingerprint", ""), fisher,
                   int(meta.get("fisher_tokens", 0)))


def _upper(c: torch.Tensor) -> torch.Tensor:
    """(d*(d+1)/2,) the upper triangle of the symmetric (d, d) ``c``, row by row."""
    rows, cols = torch.triu_indices(c.shape[0], c.shape[0])
    return c[rows, cols]


def _from_upper(packed: torch.Tensor) -> torch.Tensor:
    """(d, d) the symmetric matrix whose upper triangle :func:`_upper` packed."""
    d = int((math.isqrt(8 * packed.numel() + 1) - 1) // 2)
    rows, cols = torch.triu_indices(d, d)
    c = torch.zeros(d, d, dtype=packed.dtype)
    c[rows, cols] = packed
    c[cols, rows] = packed
    return c


def _stored(layer: int, moment: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``moment`` cast to ``dtype`` for storage, or kept fp32 where the cast would overflow.

    Some layers carry "massive activations" (a few key coordinates in the hundreds on some tokens),
    so E[k k^T] can exceed fp16's 65,504; an infinite moment would break every solve made from it.
    """
    cast = moment.to(dtype)
    if torch.isfinite(cast).all():
        return cast.contiguous()
    log.warning("layer %d: the second moment reaches %.3g, beyond %s; stored as float32", layer,
                float(moment.abs().max()), dtype)
    return moment.float().contiguous()


def find_stats_dir(model_spec: str, explicit: str | Path | None = None) -> Path | None:
    """Where a model's statistics live: ``explicit`` if given, else the dir shipped beside its editor.

    None when that directory holds no statistics file.
    """
    from editor_core.checkpoint import editors_root
    from editor_core.models import short_name

    d = Path(explicit) if explicit else editors_root() / short_name(model_spec)
    return d if (d / STATS_FILE).is_file() else None


def stats_fingerprint(model: nn.Module, layers: list[int]) -> str:
    """The fingerprint statistics are keyed by: the model's out-projection weights of ``layers``."""
    from editor_core.fingerprint import model_fingerprint

    return model_fingerprint(model, out_proj_targets(model, layers))


def stats_weights_fingerprint(model: nn.Module, layers: list[int]) -> str:
    """The dtype-insensitive (bf16-rounded) fingerprint of the same weights as :func:`stats_fingerprint`."""
    from editor_core.fingerprint import weights_fingerprint

    return weights_fingerprint(model, out_proj_targets(model, layers))


class _Stop(Exception):
    pass


@torch.no_grad()
def collect_key_stats(
    model: nn.Module,
    tokenizer,
    texts: list[str],
    layers: list[int],
    max_tokens: int = 40_000,
    batch_size: int = 16,
    max_len: int = 64,
    corpus: str = "",
    progress: bool = True,
) -> KeyStats:
    """E[k k^T] per layer over the real tokens of ``texts`` (up to ``max_tokens``).

    The forward pass stops after the deepest requested layer, so statistics of mid-depth layers
    cost a fraction of a full forward.
    """
    targets: list[Target] = out_proj_targets(model, layers)
    device = next(model.parameters()).device
    sums = {t.block: torch.zeros(t.d_in, t.d_in, dtype=torch.float64, device=device) for t in targets}
    deepest = max(t.block for t in targets)
    mask_box: list[torch.Tensor] = []

    def make_hook(block: int):
        def hook(_module, inputs):
            k = inputs[0]  # (B, T, d_in)
            m = mask_box[0]  # (B, T) bool
            keys = k[m].double()  # (n, d_in)
            sums[block].addmm_(keys.t(), keys)
            if block == deepest:
                raise _Stop
        return hook

    handles = [model.get_submodule(t.name).register_forward_pre_hook(make_hook(t.block)) for t in targets]
    seen = 0
    bar = tqdm(total=max_tokens, desc="key statistics", unit="tok", disable=not progress)
    try:
        for start in range(0, len(texts), batch_size):
            enc = tokenizer(texts[start:start + batch_size], return_tensors="pt", padding=True,
                            truncation=True, max_length=max_len)
            mask = enc["attention_mask"].bool().to(device)  # (B, T)
            n = int(mask.sum())
            mask_box[:] = [mask]
            try:
                model(input_ids=enc["input_ids"].to(device), attention_mask=mask.long(), use_cache=False)
            except _Stop:
                pass
            seen += n
            bar.update(n)
            if seen >= max_tokens:
                break
    finally:
        for h in handles:
            h.remove()
        bar.close()
    if seen == 0:
        raise StatsError("no tokens to compute statistics from")
    moments = {b: (s / seen).float() for b, s in sums.items()}
    return KeyStats(moments, seen, corpus, stats_fingerprint(model, layers),
                    weights_fingerprint=stats_weights_fingerprint(model, layers))


def ridged(c: torch.Tensor, ridge: float) -> torch.Tensor:
    """C + ridge * mean(diag C) I: keeps a near-singular moment invertible, relative to its own scale."""
    return c + ridge * c.diagonal().mean() * torch.eye(c.shape[0], dtype=c.dtype, device=c.device)


def null_space_basis(moment: torch.Tensor, n_null: int) -> torch.Tensor:
    """(d, n_null) orthonormal basis of the ``n_null`` directions of least variance of ``moment``."""
    d = moment.shape[0]
    if not 0 < n_null <= d:
        raise ValueError(f"n_null must be in 1..{d}, got {n_null}")
    _, vecs = torch.linalg.eigh(moment.double())  # ascending eigenvalues; (d, d)
    return vecs[:, :n_null].float().contiguous()


def null_space_projector(moment: torch.Tensor, n_null: int) -> torch.Tensor:
    """(d, d) projector onto the ``n_null`` directions of least variance of ``moment`` (AlphaEdit's P).

    An update whose input side lies in this subspace leaves the layer's output for the keys the
    statistics describe (nearly) unchanged.
    """
    basis = null_space_basis(moment, n_null)  # (d, n_null)
    return basis @ basis.t()


def counterfact_texts(path: str | Path, limit: int | None = None) -> list[str]:
    """Ordinary factual sentences from a CounterFact file: prompts with their TRUE answers.

    Rephrase and neighbourhood prompts (with the neighbour's answer) are included too, so the keys
    cover many subjects and relations; the counterfactual targets never are.
    """
    docs = json.loads(Path(path).read_text())
    texts: list[str] = []
    for r in docs[:limit]:
        texts.append(f"{r['prompt']} {_first(r.get('ground_truth'))}")
        if r.get("rephrase_prompt"):
            texts.append(f"{_first(r['rephrase_prompt'])} {_first(r.get('ground_truth'))}")
        if r.get("locality_prompt"):
            texts.append(f"{_first(r['locality_prompt'])} {_first(r.get('locality_ground_truth'))}")
    return texts


def sampled_texts(model: nn.Module, tokenizer, n: int = 64, length: int = 48, seed: int = 0,
                  progress: bool = True) -> list[str]:
    """Text the model writes itself from short neutral openings (sampled, temperature 1)."""
    openings = ["The", "In", "A", "It", "When", "My", "This", "There", "He", "She", "We", "According to"]
    device = next(model.parameters()).device
    gen = torch.Generator(device="cpu").manual_seed(seed)
    out: list[str] = []
    for i in tqdm(range(0, n, 8), desc="sampling corpus", disable=not progress):
        prompts = [openings[(i + j) % len(openings)] for j in range(min(8, n - i))]
        torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
        side, tokenizer.padding_side = tokenizer.padding_side, "left"  # generation continues the last column
        try:
            enc = tokenizer(prompts, return_tensors="pt", padding=True)
        finally:
            tokenizer.padding_side = side
        ids = model.generate(**{k: v.to(device) for k, v in enc.items()}, do_sample=True, max_new_tokens=length,
                             top_k=0, top_p=1.0, pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
        out += tokenizer.batch_decode(ids, skip_special_tokens=True)
    return out


def _first(value) -> str:
    while isinstance(value, list | tuple):
        value = value[0] if value else ""
    return str(value or "")


# ---- CLI glue (`mend stats`, wired up by service/cli.py) ------------------------------------------
def add_arguments(parser) -> None:
    """Add the ``mend stats`` options to an ``argparse.ArgumentParser``."""
    from editor_core.models import DEFAULT_MODEL

    parser.add_argument("--model", default=DEFAULT_MODEL, help="alias, local dir, .gguf file or HF id")
    parser.add_argument("--layers", type=int, nargs="+", default=None,
                        help="blocks whose MLP output projection is edited (default: the methods' default "
                             "layers, 4-8)")
    parser.add_argument("--corpus", choices=["counterfact", "sampled", "both"], default=None,
                        help="text the keys come from: CounterFact training prompts with their true answers "
                             "(--data), text the model samples itself, or both (default: both with --data, "
                             "else sampled)")
    parser.add_argument("--data", default=None, help="a CounterFact JSON file (never the evaluation split)")
    parser.add_argument("--tokens", type=int, default=40_000, help="tokens to average over (2-10x the key width "
                                                                   "gives most of the quality)")
    parser.add_argument("--samples", type=int, default=64, help="model-sampled texts for the sampled corpus")
    parser.add_argument("--fisher-tokens", type=int, default=12_000,
                        help="positions of the same corpus to average the value layers' Fisher over (the metric "
                             "of ValueConfig.metric='fisher'); 0 computes none")
    parser.add_argument("--out", default=None, help="output directory (default: editors/<model>/)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-progress", action="store_true")
    parser.set_defaults(_stats_parser=parser)


def run(args) -> int:
    """``mend stats``: compute, save and describe the key statistics; exit 2 on a usage error."""
    import random

    from editor_core.checkpoint import editors_root
    from editor_core.methods.locate import CONFIG_FILE, LocateConfig
    from editor_core.models import load, short_name

    parser = args._stats_parser
    corpus = args.corpus or ("both" if args.data else "sampled")
    if corpus in ("counterfact", "both") and not args.data:
        parser.error(f"--corpus {corpus} needs --data (a CounterFact JSON file)")
    if args.data and not Path(args.data).is_file():
        parser.error(f"--data: no such file {args.data}")
    if args.tokens < 1:
        parser.error("--tokens must be positive")
    if args.fisher_tokens < 0:
        parser.error("--fisher-tokens must be 0 (none) or positive")
    loaded = load(args.model, device=args.device)
    model, tokenizer = loaded.model, loaded.tokenizer
    out = Path(args.out) if args.out else editors_root() / short_name(args.model)
    fresh = not (out / CONFIG_FILE).is_file()
    config = LocateConfig.load(out)  # keep a tuned config already there; defaults otherwise
    if config.value.metric == "fisher" and not args.fisher_tokens:
        parser.error(f"--fisher-tokens 0: the config in {out} measures values in the Fisher metric "
                     "(value.metric), which needs it; give --fisher-tokens, or set value.metric to 'euclidean'")
    layers = sorted(set(args.layers)) if args.layers else config.all_layers
    try:
        out_proj_targets(model, layers)
    except ValueError as err:
        parser.error(f"--layers: {err}")
    texts: list[str] = []
    described = []
    if corpus in ("counterfact", "both"):
        cf = counterfact_texts(args.data)
        random.Random(args.seed).shuffle(cf)
        texts += cf
        described.append(f"CounterFact prompts with true answers from {Path(args.data).name}")
    if corpus in ("sampled", "both"):
        sampled = sampled_texts(model, tokenizer, n=args.samples, seed=args.seed, progress=not args.no_progress)
        texts = sampled + texts  # both: every sampled text, then CounterFact up to the token budget
        described.append(f"{args.samples} model-sampled texts (seed {args.seed})")
    stats = collect_key_stats(model, tokenizer, texts, layers, max_tokens=args.tokens, corpus="; ".join(described),
                              progress=not args.no_progress)
    if args.layers:
        config.rome_layers, config.memit_layers, config.alphaedit_layers = [layers[-1]], layers, layers
    if args.fisher_tokens:
        from editor_core.methods.value_metric import collect_value_fisher

        stats.fisher, stats.fisher_tokens = collect_value_fisher(
            model, tokenizer, texts, config.value_layers, max_tokens=args.fisher_tokens, seed=args.seed,
            progress=not args.no_progress)
        if fresh:  # a new config measures values in it, as the shipped one does (docs/LOCATE.md, "Measuring a value")
            config.value.metric = "fisher"
    path = stats.save(out / STATS_FILE)
    config.save(out)
    log.info("wrote %s: layers %s, %d tokens (%s); value Fisher at %s from %d positions", path, layers, stats.tokens,
             stats.corpus, sorted(stats.fisher), stats.fisher_tokens)
    return 0
