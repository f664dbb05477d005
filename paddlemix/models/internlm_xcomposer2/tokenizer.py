"""SentencePiece tokenizer of InternLM-XComposer2 on PaddleNLP's ``PretrainedTokenizer``.

The model was trained with the official slow tokenizer (transformers 4.33 ``PreTrainedTokenizer`` plus the
model's ``tokenization_internlm_xcomposer2.py``). Prompt ids must match it token for token, so this class
reproduces that behaviour and overrides the PaddleNLP defaults that differ from it (see ``decode`` and
``convert_tokens_to_string``).
"""
from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Union

import sentencepiece as spm
from paddlenlp.transformers import PretrainedTokenizer
from paddlenlp.transformers.tokenizer_utils_base import to_py_obj

from .files import VOCAB_FILE_NAMES
from .hub import resolve_pretrained

if TYPE_CHECKING:
    import numpy as np
    import paddle

logger = logging.getLogger(__name__)

#: Chat-format markers; ordinary SentencePiece pieces (their ids come from the model, see the properties).
IM_START_TOKEN = "[UNUSED_TOKEN_146]"
IM_END_TOKEN = "[UNUSED_TOKEN_145]"
#: Config keys not to save back: transformers' remote-code pointer, and what PaddleNLP's from_pretrained adds
#: about the source (absolute paths into it, its name), so a saved config does not depend on where it came from.
_UNSAVED_KEYS = ("auto_map", "special_tokens_map_file", "added_tokens_file", "chat_template_file",
                 "name_or_path", "from_slow")

TokenIds = Union[int, Sequence[int], "np.ndarray", "paddle.Tensor"]


def find_vocab_file(directory: Union[str, os.PathLike]) -> Path:
    """Return the SentencePiece model inside ``directory``, accepting both checkpoint layouts.

    Raises ``FileNotFoundError`` naming the directory and every file name tried, so a wrong path is obvious.
    """
    directory = Path(directory)
    for name in VOCAB_FILE_NAMES:
        if (directory / name).is_file():
            logger.debug("InternLM-XComposer2 vocabulary: %s", directory / name)
            return directory / name
    raise FileNotFoundError(
        f"no SentencePiece vocabulary in {str(directory)!r}: looked for {', '.join(VOCAB_FILE_NAMES)}"
    )


class InternLMXComposer2Tokenizer(PretrainedTokenizer):
    """InternLM2 SentencePiece tokenizer with the exact slow-tokenizer semantics of the official model.

    Encoding: text is split on the special tokens (``<s>``, ``</s>``, ``<unk>``), which become their ids and
    eat the whitespace on both sides (PaddleNLP's ``tokenize`` does this like transformers 4.33, once the
    special tokens are registered as no-split tokens); every other chunk goes through SentencePiece
    unchanged. ``add_bos_token`` prepends ``<s>``; ``add_eos_token`` appends ``</s>``.
    """

    resource_files_names = {"vocab_file": VOCAB_FILE_NAMES[0]}
    model_input_names = ["input_ids", "attention_mask"]
    padding_side = "right"

    def __init__(
        self,
        vocab_file: Union[str, os.PathLike],
        unk_token: str = "<unk>",
        bos_token: str = "<s>",
        eos_token: str = "</s>",
        pad_token: str = "</s>",
        sp_model_kwargs: Optional[Dict[str, Any]] = None,
        add_bos_token: bool = True,
        add_eos_token: bool = False,
        decode_with_prefix_space: bool = False,
        clean_up_tokenization_spaces: bool = False,
        **kwargs: Any,
    ) -> None:
        if not os.path.isfile(vocab_file):
            raise FileNotFoundError(f"SentencePiece vocabulary file not found: {str(vocab_file)!r}")
        for key in _UNSAVED_KEYS:  # init_kwargs (set by PaddleNLP's _pre_init) is what save_pretrained writes
            getattr(self, "init_kwargs", {}).pop(key, None)
        self.sp_model_kwargs = dict(sp_model_kwargs or {})
        super().__init__(unk_token=unk_token, bos_token=bos_token, eos_token=eos_token, pad_token=pad_token,
                         clean_up_tokenization_spaces=clean_up_tokenization_spaces, **kwargs)
        self.vocab_file = str(vocab_file)
        self.add_bos_token = add_bos_token
        self.add_eos_token = add_eos_token
        self.decode_with_prefix_space = decode_with_prefix_space  # kept for config round trips; unused upstream
        self.sp_model = spm.SentencePieceProcessor(**self.sp_model_kwargs)
        self.sp_model.Load(self.vocab_file)
        # PaddleNLP registers special tokens as no-split only in from_pretrained; do it here too so a tokenizer
        # built directly from a vocab file splits literal "<s>" / "</s>" the same way.
        self.sanitize_special_tokens()

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Union[str, os.PathLike], *args: Any,
                        from_aistudio: bool = False, from_hf_hub: bool = False, cache_dir: Optional[str] = None,
                        **kwargs: Any):
        """Load from a local directory in either layout (``tokenizer.model`` or ``sentencepiece.bpe.model``), or
        from a model id resolved like the model's (see :mod:`.hub`), so both come from the same source.

        PaddleNLP only looks for ``resource_files_names``; the vocabulary is located here and passed as
        ``vocab_file``. Downloads go through our resolver rather than PaddleNLP's, which would look for
        ``tokenizer.model`` only and fail offline with a less helpful error.
        """
        path = Path(resolve_pretrained(pretrained_model_name_or_path, purpose="tokenizer", from_aistudio=from_aistudio,
                                       from_hf_hub=from_hf_hub, cache_dir=cache_dir,
                                       subfolder=kwargs.pop("subfolder", None)))
        if not path.is_dir():
            raise FileNotFoundError(
                f"tokenizer directory not found: {str(path)!r} (it should hold one of {', '.join(VOCAB_FILE_NAMES)})"
            )
        if kwargs.get("vocab_file") is None:
            kwargs["vocab_file"] = str(find_vocab_file(path))
        return super().from_pretrained(str(path), *args, **kwargs)

    # ----- vocabulary --------------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.sp_model.get_piece_size()

    @property
    def bos_token_id(self) -> int:
        """Taken from the SentencePiece model, as the official tokenizer does."""
        return self.sp_model.bos_id()

    @property
    def eos_token_id(self) -> int:
        return self.sp_model.eos_id()

    @property
    def im_start_id(self) -> int:
        """Id of ``[UNUSED_TOKEN_146]`` (opens a chat turn)."""
        return self._piece_id(IM_START_TOKEN)

    @property
    def im_end_id(self) -> int:
        """Id of ``[UNUSED_TOKEN_145]`` (closes a chat turn; a second stop id for generation)."""
        return self._piece_id(IM_END_TOKEN)

    def _piece_id(self, piece: str) -> int:
        """Look a piece up, failing loudly instead of silently returning ``<unk>`` for a foreign vocabulary."""
        idx = self.sp_model.piece_to_id(piece)
        if idx == self.sp_model.unk_id() and piece != self.sp_model.id_to_piece(idx):
            raise KeyError(f"piece {piece!r} is not in the SentencePiece model {self.vocab_file!r}")
        return idx

    def get_vocab(self) -> Dict[str, int]:
        vocab = {self.sp_model.id_to_piece(i): i for i in range(self.vocab_size)}
        vocab.update(self.added_tokens_encoder)
        return vocab

    def _tokenize(self, text: str, **kwargs: Any) -> List[str]:
        return self.sp_model.encode(text, out_type=str)

    def _convert_token_to_id(self, token: str) -> int:
        return self.sp_model.piece_to_id(token)

    def _convert_id_to_token(self, index: int) -> str:
        return self.sp_model.id_to_piece(index)

    # ----- special tokens ----------------------------------------------------------------------------------
    def build_inputs_with_special_tokens(
        self, token_ids_0: List[int], token_ids_1: Optional[List[int]] = None
    ) -> List[int]:
        bos = [self.bos_token_id] if self.add_bos_token else []
        eos = [self.eos_token_id] if self.add_eos_token else []
        return bos + token_ids_0 + (token_ids_1 or []) + eos

    def get_special_tokens_mask(
        self, token_ids_0: List[int], token_ids_1: Optional[List[int]] = None, already_has_special_tokens: bool = False
    ) -> List[int]:
        """Mask of the ids ``build_inputs_with_special_tokens`` adds (1) versus text ids (0)."""
        if already_has_special_tokens:
            special = set(self.all_special_ids)
            return [int(i in special) for i in token_ids_0 + (token_ids_1 or [])]
        body = [0] * (len(token_ids_0) + len(token_ids_1 or []))
        return [1] * self.add_bos_token + body + [1] * self.add_eos_token

    def create_token_type_ids_from_sequences(
        self, token_ids_0: List[int], token_ids_1: Optional[List[int]] = None
    ) -> List[int]:
        """All zeros (the model has no segment embedding), one per id of the built input."""
        return [0] * len(self.build_inputs_with_special_tokens(token_ids_0, token_ids_1))

    # ----- decoding ----------------------------------------------------------------------------------------
    def convert_tokens_to_string(self, tokens: List[str]) -> str:
        """Official algorithm: SentencePiece-decode runs between special tokens, a space before each special run.

        The official code also always applies ``clean_up_tokenization`` here (independently of
        ``clean_up_tokenization_spaces``), then prepends a space (``_maybe_add_prefix_space`` compares string
        tokens with a set of ints, so it always adds one) and drops the first character: a net no-op.
        """
        sub_tokens: List[str] = []
        out = ""
        prev_is_special = False
        special = set(self.all_special_tokens)
        for token in tokens:
            if token in special:
                if not prev_is_special:
                    out += " "
                out += self.sp_model.decode(sub_tokens) + token
                prev_is_special, sub_tokens = True, []
            else:
                sub_tokens.append(token)
                prev_is_special = False
        out += self.sp_model.decode(sub_tokens)
        return self.clean_up_tokenization(out)

    def decode(
        self,
        token_ids: TokenIds,
        skip_special_tokens: bool = False,
        clean_up_tokenization_spaces: Optional[bool] = None,
        **kwargs: Any,
    ) -> str:
        """Decode ids; like transformers, ``clean_up_tokenization_spaces=None`` means the configured value.

        PaddleNLP defaults the flag to True, which would alter text such as ``"a ,b"``; the official config
        sets it to False.
        """
        if clean_up_tokenization_spaces is None:
            clean_up_tokenization_spaces = self.clean_up_tokenization_spaces
        token_ids = to_py_obj(token_ids)
        ids = [token_ids] if isinstance(token_ids, int) else token_ids  # base class would iterate a str
        return self._decode(ids, skip_special_tokens, clean_up_tokenization_spaces, **kwargs)

    def _decode(self, token_ids: List[int], skip_special_tokens: bool = False, clean_up_tokenization_spaces: bool = True,
                spaces_between_special_tokens: bool = True, **kwargs: Any) -> str:
        """PaddleNLP's ``_decode`` with its lookups hoisted out of the per-id loop: it reads
        ``all_special_ids``, a property rebuilt on every access, once per id (~20 µs each), so a
        1024-token answer re-decoded at every streamed step cost seconds. Same text (tested)."""
        kwargs.pop("use_source_tokenizer", None)
        skipped = set(self.all_special_ids) if skip_special_tokens else set()
        added_decoder, added_encoder = self.added_tokens_decoder, self.added_tokens_encoder
        sub_texts: List[str] = []
        run: List[str] = []
        for index in (int(i) for i in token_ids):
            if index in skipped:
                continue
            added = added_decoder.get(index)
            token = getattr(added, "content", added) if added is not None else self._convert_id_to_token(index)
            if token in added_encoder:  # added tokens are kept whole, between decoded runs
                if run:
                    sub_texts.append(self.convert_tokens_to_string(run))
                    run = []
                sub_texts.append(token)
            else:
                run.append(token)
        if run:
            sub_texts.append(self.convert_tokens_to_string(run))
        text = (" " if spaces_between_special_tokens else "").join(sub_texts)
        return self.clean_up_tokenization(text) if clean_up_tokenization_spaces else text

    def batch_decode(
        self,
        sequences: Union[Sequence[Sequence[int]], "np.ndarray", "paddle.Tensor"],
        skip_special_tokens: bool = False,
        clean_up_tokenization_spaces: Optional[bool] = None,
        **kwargs: Any,
    ) -> List[str]:
        """Decode each sequence with ``decode`` (same ``None`` default for the clean-up flag)."""
        return [self.decode(seq, skip_special_tokens, clean_up_tokenization_spaces, **kwargs) for seq in sequences]

    # ----- saving ------------------------------------------------------------------------------------------
    def save_resources(self, save_directory: Union[str, os.PathLike]) -> None:
        """Write the vocabulary as ``tokenizer.model`` (the official name) whatever the source file was called.

        Copies the source bytes when it still exists, else serialises the loaded model. Chat templates are not
        saved: this model builds its prompts in code, not from a template.
        """
        target = Path(save_directory) / self.resource_files_names["vocab_file"]
        source = Path(self.vocab_file)
        if source.is_file():
            if source.resolve() != target.resolve():
                shutil.copyfile(source, target)
        else:
            target.write_bytes(self.sp_model.serialized_model_proto())
