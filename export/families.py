"""What the ONNX export and runtime need to know per model family (tokenizers, token ranges).

- open_clip models with CLIP's BPE tokenizer: served by ``harma_fast.export.tokenizer`` (as before).
- Hugging Face folders (``create_model("path/to/folder")``): their own ``tokenizer.json`` is
  copied next to the graphs and served with the ``tokenizers`` package (Rust, no torch),
  padded and truncated as :class:`harma_fast.hf.HFTokenizer` does in training.
- Anything else (e.g. open_clip SigLIP's hub tokenizer): no tokenizer in the export; the
  runtime refuses ``encode_texts`` with a clear message and serves ``encode_tokens``.
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

HF_TOKENIZER_FILE = "tokenizer.json"


def hf_tokenizer_spec(model, name: Optional[str]) -> Optional[Dict]:
    """The tokenizer entry of ``harma.json`` for a model built from a local HF folder, else None."""
    from ..hf import is_hf_dir

    if not name or not is_hf_dir(name) or not (Path(name) / HF_TOKENIZER_FILE).is_file():
        return None
    from ..hf import HFTokenizer

    tok = HFTokenizer(name, int(model.context_length))
    return {"type": "hf_tokenizers", "file": HF_TOKENIZER_FILE, "context_length": tok.context_length,
            "pad_id": int(tok.pad_id), "source": str(name)}


def write_tokenizer_files(spec: Dict, out: Path, clip_vocab: Optional[Path]) -> None:
    """Copy what the runtime tokenizer reads into the export directory."""
    if spec["type"] == "hf_tokenizers":
        shutil.copyfile(Path(spec["source"]) / HF_TOKENIZER_FILE, out / spec["file"])
    else:
        shutil.copyfile(clip_vocab, out / spec["vocab"])


class TokenizersTokenizer:
    """``tokenizer(["a lake", ...]) -> int64 array (N, context_length)`` from a ``tokenizer.json``.

    The same ids as training's :class:`harma_fast.hf.HFTokenizer` (cut at the context length
    keeping the last token, padded with the pad id), without torch.
    """

    def __init__(self, path: Union[str, Path], context_length: int, pad_id: int):
        try:
            from tokenizers import Tokenizer
        except ImportError as err:
            from ..errors import MissingDependencyError

            raise MissingDependencyError("this export's text tower uses a Hugging Face tokenizer, which needs "
                                         "tokenizers, not installed: pip install tokenizers") from err
        self.tokenizer = Tokenizer.from_file(str(path))
        # A tokenizer.json may store its own padding or truncation (a Fixed length, another
        # max_length); the model's processor overrides both with the context length, so they go
        # here too: else a stored length above the context leaves pads where the end-of-text id
        # belongs (ids() keeps the last id), and one below it cuts texts the model would read whole.
        self.tokenizer.no_padding()
        self.tokenizer.no_truncation()
        self.context_length, self.pad_id = context_length, pad_id
        self._counter = None

    def ids(self, texts: Sequence[str]) -> List[List[int]]:
        out = []
        for enc in self.tokenizer.encode_batch(list(texts)):
            ids = list(enc.ids)
            if len(ids) > self.context_length:
                ids = ids[:self.context_length - 1] + ids[-1:]
            out.append(ids)
        return out

    def fit(self, text: str) -> Tuple[int, int]:
        """(tokens of ``text``, tokens the encoder reads of a text): the special tokens take the rest."""
        if self._counter is None:  # a copy without the truncation or padding a tokenizer.json may store
            from tokenizers import Tokenizer

            self._counter = Tokenizer.from_str(self.tokenizer.to_str())
            self._counter.no_truncation()
            self._counter.no_padding()
        content = len(self._counter.encode(text, add_special_tokens=False).ids)
        specials = len(self._counter.encode(text).ids) - content
        return content, self.context_length - specials

    def __call__(self, texts: Union[str, Sequence[str]]) -> np.ndarray:
        texts = [texts] if isinstance(texts, str) else list(texts)
        result = np.full((len(texts), self.context_length), self.pad_id, dtype=np.int64)
        for i, ids in enumerate(self.ids(texts)):
            result[i, :len(ids)] = ids
        return result


def load_tokenizer(export_dir: Path, spec: Optional[Dict]):
    """The runtime tokenizer an export's ``harma.json`` names (None when it has none)."""
    if not spec:
        return None
    if spec.get("type") == "hf_tokenizers":
        return TokenizersTokenizer(export_dir / spec["file"], int(spec["context_length"]), int(spec["pad_id"]))
    from .tokenizer import BPETokenizer

    return BPETokenizer(str(export_dir / spec["vocab"]), spec["context_length"])


def random_tokens(model, rng: np.random.Generator, batch: int, context: int, length: int) -> np.ndarray:
    """Random token ids inside the model's vocabulary, an end-of-text id last, zeros after it."""
    vocab, eot = vocab_size(model), end_of_text_id(model)
    tokens = np.zeros((batch, context), dtype=np.int64)
    length = min(context, length)
    tokens[:, :length] = rng.integers(1, min(vocab, 49406), (batch, length))
    tokens[:, length - 1] = eot
    return tokens


def _hf_text_config(model):
    return getattr(getattr(model, "config", None), "text_config", None)


def vocab_size(model) -> int:
    """The text tower's vocabulary size (open_clip: 49408 unless configured otherwise)."""
    config = _hf_text_config(model)
    if config is not None:
        return int(config.vocab_size)
    return int(getattr(model, "vocab_size", None) or getattr(getattr(model, "text", None), "vocab_size", 49408))


def end_of_text_id(model) -> int:
    config, vocab = _hf_text_config(model), vocab_size(model)
    eos = getattr(config, "eos_token_id", None)
    if isinstance(eos, int) and eos < vocab:
        return eos
    return 49407 if vocab == 49408 else vocab - 1


__all__ = ["TokenizersTokenizer", "hf_tokenizer_spec", "load_tokenizer", "random_tokens", "vocab_size",
           "end_of_text_id", "write_tokenizer_files"]
