"""Instruction tokenizers: CLIP BPE (open_clip) + the Kosmos-2 processor, as fixed-length int64 arrays.

    tokenizer = build_tokenizer(presets.tiny())
    tokens = tokenizer.encode(["go to the red box"])   # dict of int64 [B, L] arrays
    tokenizer.save(folder); load_tokenizer(folder)

Fixed L (padding to `max_instruction_tokens`) so batches stack and the exported ONNX graph has static
token shapes. Too-long instructions raise `DataError` instead of being silently cut.

Random-init presets cannot download the Kosmos-2 sentencepiece model, so they get a BPE trained here
on `text_corpus.txt` (deterministic, < 1 s), wrapped as a fast tokenizer inside the real
`Kosmos2Processor`. Two traps handled here: the processor appends ~1,100 special tokens (the model's
text vocabulary must cover them, checked by `check_vocab`), and its image-token count must equal the
model's `latent_query_num` (passed on every call).
"""

from __future__ import annotations

import functools
import json
import tempfile
from importlib import resources
from pathlib import Path

import numpy as np
import open_clip
from PIL import Image
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import CLIPImageProcessor, Kosmos2Processor, PreTrainedTokenizerFast

from mobile_vla.errors import DataError, ModelError
from mobile_vla.policy.config import CLIP_CONTEXT_LENGTH, PolicyConfig
from mobile_vla.policy.hub import from_local_or_hub

TOKEN_KEYS = ("clip_input_ids", "kosmos_input_ids", "kosmos_attention_mask", "kosmos_image_embeds_position_mask")
LOCAL_BPE_VOCAB = 1000  # trained merges + base alphabet; the processor's ~1,035 tags come on top
META_FILE = "text_tokenizer.json"
PROCESSOR_DIR = "kosmos_processor"
# Kosmos-2 tokenizer convention (XLM-R style ids): <s>=0 <pad>=1 </s>=2 <unk>=3.
SPECIAL_TOKENS = ["<s>", "<pad>", "</s>", "<unk>"]


class TextTokenizer:
    """Both tokenizers behind one `encode`; rows are cached per instruction (robots repeat them)."""

    def __init__(self, processor, num_image_tokens: int, max_instruction_tokens: int, source: str) -> None:
        self.processor = processor
        self.num_image_tokens = num_image_tokens
        self.max_instruction_tokens = max_instruction_tokens
        self.source = source  # "local-bpe" or the hub id / folder the processor came from
        self.clip_tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=CLIP_CONTEXT_LENGTH)
        self._encode_one = functools.lru_cache(maxsize=4096)(self._encode_uncached)
        # The image slots hold placeholder ids that the model overwrites; any non-None image
        # makes the processor insert them, so a tiny blank frame keeps the image processor's work trivial.
        self._blank = Image.new("RGB", (8, 8))

    def __reduce__(self):
        """Pickles (Ray tasks, Train workers) as the saved files, never as live tokenizer objects."""
        with tempfile.TemporaryDirectory() as tmp:
            self.save(tmp)
            files = {str(p.relative_to(tmp)): p.read_bytes() for p in Path(tmp).rglob("*") if p.is_file()}
        return _tokenizer_from_files, (files,)

    @property
    def token_length(self) -> int:
        """L: <s> <image> + N image slots + </image> + instruction tokens."""
        return 3 + self.num_image_tokens + self.max_instruction_tokens

    @property
    def kosmos_vocab_size(self) -> int:
        return len(self.processor.tokenizer)

    def check_vocab(self, text_vocab_size: int) -> None:
        """The model's embedding table must cover every id the processor can emit."""
        if self.kosmos_vocab_size > text_vocab_size:
            raise ModelError(
                f"Kosmos-2 tokenizer ({self.source}) has {self.kosmos_vocab_size} tokens (with the processor's "
                f"special tokens) but kosmos.text_vocab_size = {text_vocab_size}: raise text_vocab_size"
            )

    def encode(self, instructions: list[str]) -> dict[str, np.ndarray]:
        if isinstance(instructions, str) or not isinstance(instructions, (list, tuple)):
            raise DataError(f"instructions = {instructions!r}: expected a list of strings")
        rows = [self._encode_one(text) for text in instructions]
        if not rows:
            return {key: np.zeros((0, self._width(key)), np.int64) for key in TOKEN_KEYS}
        return {key: np.stack([row[i] for row in rows]) for i, key in enumerate(TOKEN_KEYS)}

    def _width(self, key: str) -> int:
        return CLIP_CONTEXT_LENGTH if key == "clip_input_ids" else self.token_length

    def _encode_uncached(self, text: str) -> tuple[np.ndarray, ...]:
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"instruction {text!r}: expected a non-empty string")
        clip_ids = self._encode_clip(text)
        encoding = self.processor(
            text=[text], images=[self._blank], num_image_tokens=self.num_image_tokens, add_eos_token=False
        )
        input_ids = list(encoding["input_ids"][0])
        attention = list(encoding["attention_mask"][0])
        position = list(encoding["image_embeds_position_mask"][0])
        length = self.token_length
        if len(input_ids) > length:
            used = len(input_ids) - (length - self.max_instruction_tokens)
            raise DataError(
                f"instruction {text[:60]!r} has {used} Kosmos-2 tokens, more than "
                f"max_instruction_tokens = {self.max_instruction_tokens}"
            )
        pad = length - len(input_ids)
        pad_id = self.processor.tokenizer.pad_token_id
        arrays = (
            clip_ids,
            np.asarray(input_ids + [pad_id] * pad, np.int64),
            np.asarray(attention + [0] * pad, np.int64),
            np.asarray(position + [0] * pad, np.int64),
        )
        for array in arrays:
            array.setflags(write=False)  # cached rows are shared between calls
        return arrays

    def _encode_clip(self, text: str) -> np.ndarray:
        tok = self.clip_tokenizer
        ids = [tok.encoder["<start_of_text>"]] + tok.encode(text) + [tok.encoder["<end_of_text>"]]
        if len(ids) > CLIP_CONTEXT_LENGTH:
            raise DataError(
                f"instruction {text[:60]!r} has {len(ids) - 2} CLIP tokens, more than {CLIP_CONTEXT_LENGTH - 2}"
            )
        return np.asarray(ids + [0] * (CLIP_CONTEXT_LENGTH - len(ids)), np.int64)

    def save(self, folder: str | Path) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.processor.save_pretrained(str(folder / PROCESSOR_DIR))
        meta = {
            "clip_tokenizer": "open_clip.SimpleTokenizer",
            "clip_context_length": CLIP_CONTEXT_LENGTH,
            "num_image_tokens": self.num_image_tokens,
            "max_instruction_tokens": self.max_instruction_tokens,
            "token_length": self.token_length,
            "source": self.source,
        }
        (folder / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")


def _tokenizer_from_files(files: dict[str, bytes]) -> TextTokenizer:
    with tempfile.TemporaryDirectory() as tmp:
        for name, blob in files.items():
            (Path(tmp) / name).parent.mkdir(parents=True, exist_ok=True)
            (Path(tmp) / name).write_bytes(blob)
        return load_tokenizer(tmp)


def build_tokenizer(config: PolicyConfig) -> TextTokenizer:
    """Hub/local Kosmos-2 processor for pretrained weights, else the locally trained BPE."""
    kosmos = config.kosmos
    if kosmos.pretrained:
        processor = _load_pretrained_processor(kosmos.pretrained)
        source = kosmos.pretrained
    else:
        processor = build_local_processor()
        source = "local-bpe"
    tokenizer = TextTokenizer(processor, kosmos.latent_query_num, kosmos.max_instruction_tokens, source)
    tokenizer.check_vocab(kosmos.text_vocab_size)
    return tokenizer


def load_tokenizer(folder: str | Path) -> TextTokenizer:
    """The tokenizer `TextTokenizer.save` wrote to `folder`; ModelError when the files are missing or bad."""
    folder = Path(folder)
    meta_path = folder / META_FILE
    try:
        meta = json.loads(meta_path.read_text())
        num_image_tokens = int(meta["num_image_tokens"])
        max_instruction_tokens = int(meta["max_instruction_tokens"])
    except FileNotFoundError:
        raise ModelError(f"{meta_path}: missing (not a saved text tokenizer)") from None
    except (ValueError, KeyError, TypeError) as exc:
        raise ModelError(f"{meta_path}: invalid tokenizer metadata ({exc})") from None
    try:
        processor = Kosmos2Processor.from_pretrained(str(folder / PROCESSOR_DIR), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ModelError(f"{folder / PROCESSOR_DIR}: cannot load the Kosmos-2 processor ({exc})") from None
    return TextTokenizer(processor, num_image_tokens, max_instruction_tokens, str(meta.get("source", folder)))


def _load_pretrained_processor(name_or_path: str):
    try:
        return from_local_or_hub(Kosmos2Processor.from_pretrained, name_or_path)
    except (OSError, ValueError) as exc:
        raise ModelError(
            f"cannot load the pretrained Kosmos-2 processor from {name_or_path!r}: no network and no local "
            f"folder ({type(exc).__name__}); pass a local folder path or use preset small"
        ) from None


def corpus_lines() -> list[str]:
    """The shipped instruction corpus the local BPE is trained on (comments and blank lines dropped)."""
    text = resources.files("mobile_vla.policy").joinpath("text_corpus.txt").read_text()
    return [line for line in text.splitlines() if line.strip() and not line.startswith("#")]


@functools.lru_cache(maxsize=1)
def _local_tokenizer_json() -> str:
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.normalizer = normalizers.NFKC()
    bpe.pre_tokenizer = pre_tokenizers.Metaspace()
    bpe.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(
        vocab_size=LOCAL_BPE_VOCAB,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte-like char has an id: few <unk>
        show_progress=False,
    )
    bpe.train_from_iterator(corpus_lines(), trainer)
    return bpe.to_str()


def build_local_processor():
    """A real `Kosmos2Processor` around a BPE trained on the shipped corpus (random-init presets)."""
    fast = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_local_tokenizer_json()),
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        padding_side="right",
    )
    image_processor = CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224})
    return Kosmos2Processor(image_processor, fast)
