"""Tokenizers behind one small interface: tokenizer.json files (the tokenizers package) and SentencePiece .model
files, with the special tokens and the chat template that the checkpoint's tokenizer_config.json declares."""
import contextlib
import json
import signal
import threading
from pathlib import Path
from typing import Iterator, Optional

from checkpoint import CheckpointError, UsageError


class Tokenizer:
    """encode / decode text, bos_id / eos_ids, special tokens, and apply_chat_template."""

    def __init__(self, folder: Path):
        folder = Path(folder)
        config = self._read_json(folder / "tokenizer_config.json")
        generation = self._read_json(folder / "generation_config.json")
        template = folder / "chat_template.jinja"  # newer transformers checkpoints keep the template apart
        self.chat_template: Optional[str] = template.read_text() if template.is_file() else config.get("chat_template")
        if isinstance(self.chat_template, list):  # a list of named templates: use the default one
            self.chat_template = next((t["template"] for t in self.chat_template if t.get("name") == "default"), None)
        self.folder = folder
        if (folder / "tokenizer.json").is_file():
            from tokenizers import Tokenizer as HFTokenizer

            try:
                self._hf = HFTokenizer.from_file(str(folder / "tokenizer.json"))
            except Exception as e:  # the tokenizers package raises plain Exceptions for broken files
                raise CheckpointError(f"cannot read {folder / 'tokenizer.json'}: {str(e)[:200]}") from None
            self._sp = None
            self.vocab_size = self._hf.get_vocab_size()
            self.special_tokens = {t.content: i for i, t in self._hf.get_added_tokens_decoder().items() if t.special}
        elif (folder / "tokenizer.model").is_file():
            from sentencepiece import SentencePieceProcessor

            self._hf = None
            try:
                self._sp = SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
            except Exception as e:
                raise CheckpointError(f"cannot read {folder / 'tokenizer.model'}: {str(e)[:200]}") from None
            self.vocab_size = self._sp.vocab_size()
            self.special_tokens = {self._sp.id_to_piece(i): i for i in range(self.vocab_size)
                                   if self._sp.is_control(i) or self._sp.is_unknown(i)}
            for i, t in config.get("added_tokens_decoder", {}).items():
                if t.get("special"):
                    self.special_tokens[t["content"]] = int(i)
        else:
            raise CheckpointError(f"{folder} has no tokenizer.json or tokenizer.model")
        self.bos_token = self._token_text(config.get("bos_token"))
        self.eos_token = self._token_text(config.get("eos_token"))
        self.bos_id = self.token_id(self.bos_token)
        eos = generation.get("eos_token_id", [])
        self.eos_ids = {self.token_id(self.eos_token)} | set(eos if isinstance(eos, list) else [eos])
        self.eos_ids.discard(None)
        # SentencePiece models add bos by default unless the config says otherwise; byte-level BPE ones do not.
        self.add_bos = config.get("add_bos_token", self._sp is not None) and self.bos_id is not None

    @staticmethod
    def _read_json(path: Path) -> dict:
        try:
            value = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
        except (OSError, ValueError, RecursionError) as e:  # (ValueError includes bad UTF-8)
            raise CheckpointError(f"cannot parse {path}: {str(e)[:200]}") from None
        if not isinstance(value, dict):
            raise CheckpointError(f"{path} is not a JSON object")
        return value

    @staticmethod
    def _token_text(token) -> Optional[str]:
        return token.get("content") if isinstance(token, dict) else token

    def token_id(self, text: Optional[str]) -> Optional[int]:
        if text is None:
            return None
        if text in self.special_tokens:
            return self.special_tokens[text]
        i = self._hf.token_to_id(text) if self._hf else self._sp.piece_to_id(text)
        return None if i is None or (self._sp is not None and i == self._sp.unk_id() and text != "<unk>") else i

    def encode(self, text: str, bos: Optional[bool] = None) -> list[int]:
        """Token ids of text; special tokens written in the text (as a chat template does) become their ids."""
        if self._hf is not None:
            ids = self._hf.encode(text, add_special_tokens=False).ids
        else:
            ids = self._encode_sentencepiece(text)
        if (self.add_bos if bos is None else bos) and (not ids or ids[0] != self.bos_id):
            ids = [self.bos_id] + ids
        return ids

    def _encode_sentencepiece(self, text: str) -> list[int]:
        # SentencePiece treats "<s>" as plain text: split on the special tokens ourselves, longest first.
        specials = sorted((t for t in self.special_tokens if t and t in text), key=len, reverse=True)
        if not specials:
            return self._sp.encode(text)
        ids, start = [], 0
        while start < len(text):
            hits = [(text.find(t, start), -len(t), t) for t in specials if text.find(t, start) >= 0]
            if not hits:
                ids += self._sp.encode(text[start:])
                break
            pos, _, token = min(hits)
            if pos > start:
                ids += self._sp.encode(text[start:pos])
            ids.append(self.special_tokens[token])
            start = pos + len(token)
        return ids

    def decode(self, ids: list[int], skip_special: bool = False) -> str:
        if self._hf is not None:
            return self._hf.decode(list(ids), skip_special_tokens=skip_special)
        if skip_special:
            ids = [i for i in ids if i not in self.special_tokens.values()]
        return self._sp.decode(list(ids))

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """Renders messages ({"role", "content"}) with the checkpoint's Jinja chat template, as transformers does."""
        if not self.chat_template:
            raise UsageError("this checkpoint has no chat template; use --no-chat")
        import jinja2
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise CheckpointError(f"chat template: {message}")

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
        env.filters["tojson"] = lambda x, indent=None, **kw: json.dumps(x, indent=indent, ensure_ascii=False)
        env.globals["raise_exception"] = raise_exception
        try:
            with time_limit(TEMPLATE_SECONDS):
                return env.from_string(self.chat_template).render(
                    messages=messages, add_generation_prompt=add_generation_prompt,
                    bos_token=self.bos_token or "", eos_token=self.eos_token or "")
        except CheckpointError:
            raise
        except TimeoutError:
            raise CheckpointError(f"the chat template of {self.folder} took over {TEMPLATE_SECONDS} s to render "
                                  "(a loop without end?)") from None
        except (jinja2.TemplateError, MemoryError, ArithmeticError, TypeError, ValueError, LookupError,
                AttributeError, RecursionError) as e:  # whatever the template's own code raises
            raise CheckpointError(f"the chat template of {self.folder} failed: {type(e).__name__}: {e}") from None


TEMPLATE_SECONDS = 5  # a chat template renders in milliseconds; the sandbox bounds what it may touch, not its time


@contextlib.contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Raises TimeoutError in the block after `seconds` (SIGALRM: the main thread of a POSIX process; elsewhere no
    limit)."""
    if not hasattr(signal, "setitimer") or threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        raise TimeoutError

    previous = signal.signal(signal.SIGALRM, stop)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
