"""Self-contained serving artifacts: export an Engine's programs, serve them without `model/`.

    export(engine, "out/", platforms=("cpu", "cuda", "tpu"))    # scripts/export.py
    art = load("out/")                                          # imports jax, numpy, tokenizers,
    art.generate(["Hello"], max_new_tokens=16)                  # safetensors; never model/
    ArtifactEngine.load("out/")     # serving.artifact_engine: continuous batching, HTTP server

An artifact directory holds:
  manifest.json             shapes, buckets, versions, config, and a sha256 of every file
  weights.safetensors       the parameters (inputs of the programs, not constants)
  tokenizer.json, tokenizer_config.json, generation_config.json
  programs/<platform>/prefill_r{rows}_t{len}.jaxexp, decode_r{rows}.jaxexp   (jax.export)
Programs are flat: (param leaves..., k_cache, v_cache, inputs...) -> (logits, k_cache, v_cache),
with the KV cache paged as in the Engine: [layers, kv_heads, num_pages, page_size, head_dim],
page 0 the sink for padding, page_table [rows, W] (W pages_per_seq). Artifact.generate gives
slot b pages 1 + b*W ... (b+1)*W; ArtifactEngine hands pages out with serving.kv_pages.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time

import numpy as np

ARTIFACT_FORMAT = "xlrt-artifact"
ARTIFACT_VERSION = 1
MANIFEST = "manifest.json"
WEIGHTS = "weights.safetensors"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json")
PLATFORMS = ("cpu", "cuda", "tpu")


class ArtifactError(ValueError):
    """A missing, damaged or incompatible artifact; the message names the file and the problem."""


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _pow2s(lo: int, hi: int) -> list[int]:
    out = [lo]
    while out[-1] < hi:
        out.append(out[-1] * 2)
    return out


def _bucket(n: int, buckets) -> int | None:
    fits = [b for b in buckets if b >= n]
    return min(fits) if fits else None


# ============================================================================ export
@dataclasses.dataclass(frozen=True)
class ExportShapes:
    """Buckets of an artifact: batch rows, prefill lengths, and the context per sequence."""

    max_batch: int = 4
    max_seq_len: int = 1024
    prefill_lengths: tuple[int, ...] = (16, 64, 256)

    def validate(self) -> "ExportShapes":
        if self.max_batch < 1 or self.max_seq_len < 1:
            raise ArtifactError(f"max_batch and max_seq_len must be >= 1, got {self}")
        if not self.prefill_lengths or any(t < 1 for t in self.prefill_lengths):
            raise ArtifactError(f"prefill_lengths must be positive, got {self.prefill_lengths}")
        return self


def _attention_for(platform: str) -> str:
    # Dispatch happens at trace time: the XLA reference on CPU, the Pallas kernels of the
    # target on GPU and TPU (model/kernels reads the platform after the colon).
    return "xla" if platform == "cpu" else f"auto:{platform}"


def export(engine, out_dir: str, *, platforms=("cpu",), shapes: ExportShapes = ExportShapes(),
           progress: bool = False) -> dict:
    """Write engine's prefill/decode programs, weights and tokenizer to out_dir; returns the
    manifest. Programs are exported per platform ("cpu", "cuda", "tpu") with jax.export."""
    import jax
    import jax.numpy as jnp
    import jaxlib
    from safetensors.numpy import save_file

    from model.decoder import KVCache, decode_step, prefill
    from model.programs import export_for

    shapes = shapes.validate()
    unknown = [p for p in platforms if p not in PLATFORMS]
    if unknown or not platforms:
        raise ArtifactError(f"platforms must be among {PLATFORMS}, got {list(platforms)}")
    if engine.quantization:
        raise ArtifactError(f"exporting quantized engines (quantization="
                            f"{engine.quantization!r}) is not supported; export the "
                            "float32/bfloat16 model")
    if getattr(engine, "kv_cache_dtype", "auto") != "auto":
        raise ArtifactError(f"exporting an engine with kv_cache_dtype={engine.kv_cache_dtype!r} "
                            "is not supported: artifacts carry a KV cache in the model dtype; "
                            "export an engine with kv_cache_dtype='auto'")
    cfg = engine.config
    max_seq_len = min(shapes.max_seq_len, engine.max_seq_len)
    page_size = engine.page_size
    pages_per_seq = -(-max_seq_len // page_size)
    num_pages = 1 + shapes.max_batch * pages_per_seq
    rows = _pow2s(1, shapes.max_batch)
    lengths = sorted({min(t, 1 << (max_seq_len - 1).bit_length()) for t in shapes.prefill_lengths})

    os.makedirs(out_dir, exist_ok=True)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(engine.params)
    names = [jax.tree_util.keystr(p, simple=True, separator="/") for p, _ in leaves]
    host = {n: np.asarray(x) for n, (_, x) in zip(names, leaves)}
    if any(a.dtype == jnp.bfloat16 for a in host.values()):
        host = {n: a.astype(np.float32) if a.dtype == jnp.bfloat16 else a for n, a in host.items()}
    save_file(host, os.path.join(out_dir, WEIGHTS))
    engine.tokenizer.save_hf(out_dir)
    dtype = engine.dtype
    param_avals = [jax.ShapeDtypeStruct(x.shape, x.dtype) for _, x in leaves]
    cache_aval = jax.ShapeDtypeStruct(
        (cfg.num_layers, cfg.num_kv_heads, num_pages, page_size, cfg.head_dim), dtype)
    sds, i32 = jax.ShapeDtypeStruct, jnp.int32
    programs = []
    jobs = [(p, "prefill", r, t) for p in platforms for r in rows for t in lengths]
    jobs += [(p, "decode", r, None) for p in platforms for r in rows]
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(jobs), desc="exporting", unit="program")
    models = {}
    for platform, kind, r, t in jobs:
        if platform not in models:
            models[platform] = engine.model.clone(attention_impl=_attention_for(platform),
                                                  parent=None)
        model = models[platform]
        if kind == "prefill":
            def fn(param_leaves, k, v, tokens, positions, page_table, kv_lens, logits_at,
                   _m=model):
                params = jax.tree.unflatten(treedef, param_leaves)
                logits, cache = prefill(_m, params, tokens, positions, KVCache(k, v), page_table,
                                        kv_lens, logits_at)
                return logits.astype(jnp.float32), cache.k, cache.v
            args = (param_avals, cache_aval, cache_aval, sds((r, t), i32), sds((r, t), i32),
                    sds((r, pages_per_seq), i32), sds((r,), i32), sds((r,), i32))
            name = f"prefill_r{r}_t{t}"
        else:
            def fn(param_leaves, k, v, tokens, positions, page_table, _m=model):
                params = jax.tree.unflatten(treedef, param_leaves)
                logits, cache = decode_step(_m, params, tokens, positions, KVCache(k, v),
                                            page_table)
                return logits.astype(jnp.float32), cache.k, cache.v
            args = (param_avals, cache_aval, cache_aval, sds((r,), i32), sds((r,), i32),
                    sds((r, pages_per_seq), i32))
            name = f"decode_r{r}"
        exported = export_for(fn, args, platform)
        rel = os.path.join("programs", platform, name + ".jaxexp")
        os.makedirs(os.path.join(out_dir, "programs", platform), exist_ok=True)
        with open(os.path.join(out_dir, rel), "wb") as f:
            f.write(exported.serialize())
        programs.append({"platform": platform, "kind": kind, "rows": r, "length": t,
                         "file": rel, "attention": model.attention_impl})
        if bar:
            bar.update(1)
    if bar:
        bar.close()
    tok = engine.tokenizer
    files = [WEIGHTS, *TOKENIZER_FILES, *(p["file"] for p in programs)]
    manifest = {
        "format": ARTIFACT_FORMAT, "artifact_version": ARTIFACT_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "jax": jax.__version__, "jaxlib": jaxlib.__version__,
        "model": cfg.name, "model_config": cfg.to_dict(), "model_config_hash": cfg.fingerprint(),
        "source": engine.source, "dtype": engine.dtype_name, "platforms": list(platforms),
        "vocab_size": cfg.vocab_size, "page_size": page_size, "pages_per_seq": pages_per_seq,
        "num_pages": num_pages, "max_seq_len": max_seq_len,
        "cache_shape": list(cache_aval.shape),
        "buckets": {"rows": rows, "prefill_lengths": lengths},
        "tokenizer": {"bos_id": tok.bos_id, "eos_ids": sorted(engine.eos_ids),
                      "add_bos": tok.add_bos, "add_eos": tok.add_eos},
        "params": [{"name": n, "shape": list(a.shape), "dtype": str(a.dtype)}
                   for n, a in zip(names, param_avals)],
        "programs": programs,
        "sha256": {f: sha256_file(os.path.join(out_dir, f)) for f in files},
    }
    with open(os.path.join(out_dir, MANIFEST), "w") as f:
        json.dump(manifest, f, indent=1)
    return manifest


# ============================================================================ load and run
class ArtifactTokenizer:
    """encode/decode from tokenizer.json with the Engine tokenizer's BOS/EOS rules, and the chat
    template of tokenizer_config.json rendered as the Engine's tokenizer renders it."""

    def __init__(self, directory: str, info: dict):
        from tokenizers import Tokenizer
        self.backend = Tokenizer.from_file(os.path.join(directory, "tokenizer.json"))
        self.bos_id = info["bos_id"]
        self.eos_ids = frozenset(info["eos_ids"])
        self.add_bos, self.add_eos = info["add_bos"], info["add_eos"]
        self.eos_id = min(self.eos_ids) if self.eos_ids else None
        config_path = os.path.join(directory, "tokenizer_config.json")
        config = {}
        if os.path.isfile(config_path):
            with open(config_path, encoding="utf-8") as f:
                config = json.load(f)
        template = config.get("chat_template")
        if template is not None and not isinstance(template, str):
            raise ArtifactError(f"tokenizer_config.json chat_template is a "
                                f"{type(template).__name__}, not a string")
        self.chat_template = template
        # Templates want the special tokens' literal text, e.g. "<|im_start|>".
        self._bos_text = config.get("bos_token") or ""
        self._eos_text = config.get("eos_token") or ""
        self._template = None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = self.backend.encode(text, add_special_tokens=False).ids
        if not add_special_tokens:
            return ids
        if self.add_bos and self.bos_id is not None and (not ids or ids[0] != self.bos_id):
            ids.insert(0, self.bos_id)
        if self.add_eos and self.eos_id is not None:
            ids.append(self.eos_id)
        return ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            tokenize: bool = False, **kwargs) -> str | list[int]:
        """The prompt text of `messages` (or its ids when `tokenize`, encoded without adding
        BOS: templates write it). ArtifactError names a bad message or template."""
        if self.chat_template is None:
            raise ArtifactError("this artifact's tokenizer_config.json has no chat template")
        if not isinstance(messages, list) or not messages:
            raise ArtifactError("messages must be a non-empty list of {'role', 'content'} dicts")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not m["role"] \
                    or not isinstance(m.get("content"), str):
                raise ArtifactError(f"message {i} needs a non-empty 'role' string and a "
                                    f"'content' string")
        if self._template is None:
            try:
                self._template = _chat_environment().from_string(self.chat_template)
            except Exception as e:
                raise ArtifactError(f"the chat template does not parse: {e}") from None
        context = {"bos_token": self._bos_text, "eos_token": self._eos_text, **kwargs,
                   "messages": messages, "add_generation_prompt": add_generation_prompt}
        try:
            text = self._template.render(**context)
        except ArtifactError:
            raise
        except Exception as e:
            raise ArtifactError(f"rendering the chat template failed: "
                                f"{type(e).__name__}: {e}") from None
        return self.encode(text, add_special_tokens=False) if tokenize else text


def _chat_environment():
    """A sandboxed jinja2 environment with the settings and globals chat templates expect
    (trim/lstrip blocks, loop controls, tojson keeping non-ASCII, raise_exception,
    strftime_now), as model/tokenizer.py sets up for the Engine (which artifacts cannot import)."""
    import datetime

    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise ArtifactError(f"chat template error: {message}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[loopcontrols])
    env.filters["tojson"] = lambda x, ensure_ascii=False, indent=None, separators=None, \
        sort_keys=False: json.dumps(x, ensure_ascii=ensure_ascii, indent=indent,
                                    separators=separators, sort_keys=sort_keys)
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    return env


@dataclasses.dataclass
class ArtifactOutput:
    token_ids: list[int]
    text: str
    finish_reason: str  # "stop" (EOS, stop token or stop string), "length" or "abort"
    prompt_token_ids: list[int]
    logprobs: list | None = None  # ArtifactEngine: per token (logprob, [(id, logprob) x top-n])


def _version(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in v.split(".")[:3] if x.isdigit())


class Artifact:
    """An exported model: `generate(prompts, ...)` and `.tokenizer`; no `model/` import."""

    def __init__(self, directory: str, manifest: dict, platform: str):
        import jax
        from safetensors.numpy import load_file
        self.directory, self.manifest, self.platform = directory, manifest, platform
        self.tokenizer = ArtifactTokenizer(directory, manifest["tokenizer"])
        weights = load_file(os.path.join(directory, WEIGHTS))
        missing = [p["name"] for p in manifest["params"] if p["name"] not in weights]
        if missing:
            raise ArtifactError(f"{WEIGHTS} lacks {len(missing)} tensors, e.g. {missing[0]}")
        self.params = [jax.device_put(weights[p["name"]].astype(p["dtype"]))
                       for p in manifest["params"]]
        self.rows = manifest["buckets"]["rows"]
        self.lengths = manifest["buckets"]["prefill_lengths"]
        self.pages_per_seq = manifest["pages_per_seq"]
        self.page_size = manifest["page_size"]
        self.max_seq_len = manifest["max_seq_len"]
        self.vocab_size = manifest["vocab_size"]
        self._files = {(p["kind"], p["rows"], p["length"]): p["file"]
                       for p in manifest["programs"] if p["platform"] == platform}
        self._programs: dict = {}
        dtype = {"float32": np.float32, "bfloat16": jax.numpy.bfloat16}[manifest["dtype"]]
        self._cache_shape, self._cache_dtype = tuple(manifest["cache_shape"]), dtype
        self._k = self._v = None

    def program(self, kind: str, rows: int, length: int | None = None):
        """The jitted exported program: ("prefill", rows, length) or ("decode", rows). Both
        take (params, k_cache, v_cache, ...) and donate the caches."""
        key = (kind, rows, length)
        if key not in self._programs:
            import jax
            with open(os.path.join(self.directory, self._files[key]), "rb") as f:
                try:
                    exported = jax.export.deserialize(bytearray(f.read()))
                except Exception as e:
                    raise ArtifactError(f"{self._files[key]} cannot be deserialized by jax "
                                        f"{jax.__version__} ({type(e).__name__}: {e})") from None
            self._programs[key] = jax.jit(exported.call, donate_argnums=(1, 2))
        return self._programs[key]

    def new_cache(self):
        """Zeroed (k_cache, v_cache), each [layers, kv_heads, num_pages, page_size, head_dim]."""
        import jax.numpy as jnp
        return (jnp.zeros(self._cache_shape, self._cache_dtype),
                jnp.zeros(self._cache_shape, self._cache_dtype))

    def _fresh_cache(self):
        if self._k is None:  # reused across calls: every sequence rewrites what it reads
            self._k, self._v = self.new_cache()

    def _pick(self, logits: np.ndarray, temperature: float, top_k: int, rng, positions):
        if temperature <= 0:
            return logits.argmax(axis=-1).astype(np.int32)
        z = logits.astype(np.float64) / temperature
        if top_k:
            kth = np.sort(z, axis=-1)[:, -top_k][:, None]
            z = np.where(z < kth, -np.inf, z)
        p = np.exp(z - z.max(axis=-1, keepdims=True))
        p /= p.sum(axis=-1, keepdims=True)
        return np.array([rng.choice(len(row), p=row) for row in p], np.int32)

    def generate(self, prompts, max_new_tokens: int = 64, temperature: float = 0.0,
                 top_k: int = 0, seed: int = 0, ignore_eos: bool = False) -> list[ArtifactOutput]:
        """Complete each prompt (a string or a list of token ids). Greedy at temperature 0 (the
        same tokens as Engine.generate); otherwise temperature/top-k sampling on the host."""
        if isinstance(prompts, str) or (len(prompts) and isinstance(prompts[0], (int, np.integer))):
            prompts = [prompts]
        if not len(prompts):
            raise ArtifactError("no prompts given")
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ArtifactError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
        ids = []
        for p in prompts:
            seq = self.tokenizer.encode(p) if isinstance(p, str) else [int(t) for t in p]
            if not seq or any(not 0 <= t < self.vocab_size for t in seq):
                raise ArtifactError(f"prompts need >= 1 token, ids in [0, {self.vocab_size})")
            if len(seq) + max_new_tokens > self.max_seq_len:
                raise ArtifactError(f"prompt of {len(seq)} tokens + max_new_tokens="
                                    f"{max_new_tokens} exceeds the artifact's context "
                                    f"{self.max_seq_len}")
            ids.append(seq)
        rng = np.random.default_rng(seed)
        out = []
        batch = max(self.rows)
        for i in range(0, len(ids), batch):
            out += self._generate_batch(ids[i:i + batch], max_new_tokens, temperature, top_k, rng,
                                        ignore_eos)
        return out

    def _generate_batch(self, prompts, max_new, temperature, top_k, rng, ignore_eos):
        n = len(prompts)
        r = _bucket(n, self.rows)
        w = self.pages_per_seq
        table = np.zeros((r, w), np.int32)
        for b in range(n):
            table[b] = 1 + b * w + np.arange(w)
        self._fresh_cache()
        lens = np.array([len(p) for p in prompts])
        last_logits = np.zeros((n, self.vocab_size), np.float32)
        start = 0
        tmax = max(self.lengths)
        while start < lens.max():  # chunked prefill, all rows in step
            chunk = [p[start:start + tmax] for p in prompts]
            t = _bucket(max(1, max(len(c) for c in chunk)), self.lengths)
            tokens = np.zeros((r, t), np.int32)
            positions = np.broadcast_to(start + np.arange(t, dtype=np.int32), (r, t)).copy()
            kv_lens = np.zeros(r, np.int32)
            logits_at = np.zeros(r, np.int32)
            for b, c in enumerate(chunk):
                tokens[b, :len(c)] = c
                kv_lens[b] = start + len(c) if c else 0
                logits_at[b] = max(len(c) - 1, 0)
            logits, self._k, self._v = self.program("prefill", r, t)(
                self.params, self._k, self._v, tokens, positions, table, kv_lens, logits_at)
            logits = np.asarray(logits)
            for b, c in enumerate(chunk):
                if c and start + len(c) == lens[b]:
                    last_logits[b] = logits[b]
            start += tmax
        outputs = [[] for _ in range(n)]
        done = np.zeros(n, bool)
        reasons = ["length"] * n
        nxt = self._pick(last_logits, temperature, top_k, rng, lens)
        pos = lens.copy()  # position of the token being fed next
        program = self.program("decode", r)
        while True:
            for b in range(n):
                if done[b]:
                    continue
                outputs[b].append(int(nxt[b]))
                if not ignore_eos and int(nxt[b]) in self.tokenizer.eos_ids:
                    done[b], reasons[b] = True, "stop"
                elif len(outputs[b]) >= max_new:
                    done[b] = True
            if done.all():
                break
            tokens = np.zeros(r, np.int32)
            positions = np.zeros(r, np.int32)
            tokens[:n] = [o[-1] for o in outputs]
            positions[:n] = np.minimum(pos, self.max_seq_len - 1)
            step_table = table.copy()
            step_table[np.flatnonzero(done)] = 0  # finished rows write to the sink page
            logits, self._k, self._v = program(self.params, self._k, self._v, tokens, positions,
                                               step_table)
            nxt = self._pick(np.asarray(logits)[:n], temperature, top_k, rng, pos)
            pos = pos + 1
        return [ArtifactOutput(o, self.tokenizer.decode(o), reasons[b], list(prompts[b]))
                for b, o in enumerate(outputs)]


def verify(directory: str) -> dict:
    """The manifest, after checking format, version and every file's sha256 (ArtifactError)."""
    path = os.path.join(directory, MANIFEST)
    if not os.path.isfile(path):
        raise ArtifactError(f"{directory} is not an artifact: {MANIFEST} is missing")
    try:
        with open(path) as f:
            manifest = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ArtifactError(f"{path} is unreadable: {e}") from None
    if manifest.get("format") != ARTIFACT_FORMAT:
        raise ArtifactError(f"{path} is not an xlrt artifact manifest")
    if manifest.get("artifact_version") != ARTIFACT_VERSION:
        raise ArtifactError(f"artifact version {manifest.get('artifact_version')!r} is not "
                            f"supported (this xlrt reads version {ARTIFACT_VERSION}); re-export it")
    import jax
    if _version(manifest.get("jax", "0")) > _version(jax.__version__):
        raise ArtifactError(f"the artifact was exported with jax {manifest['jax']}, newer than "
                            f"the installed jax {jax.__version__}; upgrade jax or re-export")
    for rel, digest in manifest.get("sha256", {}).items():
        full = os.path.join(directory, rel)
        if not os.path.isfile(full):
            raise ArtifactError(f"artifact file {rel} is missing from {directory}")
        if sha256_file(full) != digest:
            raise ArtifactError(f"checksum mismatch for {rel}: the file was modified or damaged")
    return manifest


def load(directory: str, platform: str | None = None) -> Artifact:
    """Verify and load an artifact for `platform` (default: the local JAX backend)."""
    import jax
    manifest = verify(directory)
    platform = platform or {"gpu": "cuda"}.get(jax.default_backend(), jax.default_backend())
    if platform not in manifest["platforms"]:
        raise ArtifactError(f"the artifact has programs for {manifest['platforms']}, not for "
                            f"{platform!r}; re-export with --platforms including {platform}")
    return Artifact(directory, manifest, platform)
