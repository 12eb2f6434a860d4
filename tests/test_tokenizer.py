"""tokenizer.py: both back ends (tokenizer.json and SentencePiece) behind one interface, special tokens, chat templates."""
import json

import pytest

from checkpoint import CheckpointError
from tokenizer import Tokenizer

TEXT = ["The quick brown fox jumps over the lazy dog.", "Speculative decoding drafts tokens and verifies them.",
        "Small models run on small machines; large ones need memory.", "Numbers: 1 2 3 and words, words, words."] * 20


@pytest.fixture(scope="module")
def sentencepiece_folder(tmp_path_factory):
    import sentencepiece as spm

    folder = tmp_path_factory.mktemp("sp")
    spm.SentencePieceTrainer.train(sentence_iterator=iter(TEXT), model_prefix=str(folder / "tokenizer"), vocab_size=400, byte_fallback=True,
                                   model_type="bpe", bos_id=1, eos_id=2, unk_id=0, pad_id=-1, minloglevel=2)
    template = ("{% for m in messages %}{{ bos_token }}[INST] {{ m['content'] }} [/INST]{% endfor %}")
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": True, "chat_template": template}))
    return folder


def test_sentencepiece_roundtrip_and_bos(sentencepiece_folder):
    tok = Tokenizer(sentencepiece_folder)
    assert (tok.bos_id, tok.eos_ids) == (1, {2})
    ids = tok.encode(TEXT[0])
    assert ids[0] == 1 and tok.decode(ids[1:]) == TEXT[0]
    assert tok.encode(TEXT[0], bos=False) == ids[1:]


def test_sentencepiece_special_tokens_in_text_become_ids(sentencepiece_folder):
    tok = Tokenizer(sentencepiece_folder)
    text = tok.apply_chat_template([{"role": "user", "content": "the quick fox"}])
    assert text == "<s>[INST] the quick fox [/INST]"
    ids = tok.encode(text, bos=False)
    assert ids[0] == 1 and ids.count(1) == 1, "'<s>' in the template must become the bos id, not text"
    assert tok.decode(ids, skip_special=True) == "[INST] the quick fox [/INST]"


def test_tokenizer_json_backend(default_checkpoint):
    tok = Tokenizer(default_checkpoint)
    assert tok.special_tokens["<|im_start|>"] == 1 and tok.eos_ids == {2} and not tok.add_bos
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}])
    assert text.endswith("<|im_start|>assistant\n")
    ids = tok.encode(text)
    assert ids.count(1) == 3  # system, user and assistant turns each start with one <|im_start|> token
    assert tok.decode(ids) == text


def test_missing_tokenizer_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="no tokenizer.json or tokenizer.model"):
        Tokenizer(tmp_path)


def test_no_chat_template_is_a_clear_error(sentencepiece_folder, tmp_path):
    (tmp_path / "tokenizer.model").write_bytes((sentencepiece_folder / "tokenizer.model").read_bytes())
    with pytest.raises(ValueError, match="no chat template"):
        Tokenizer(tmp_path).apply_chat_template([{"role": "user", "content": "x"}])


@pytest.mark.parametrize("name,content,message", [
    ("tokenizer.json", "{broken", "cannot read .*tokenizer.json"),
    ("tokenizer_config.json", "[" * 100000, "cannot parse .*tokenizer_config.json"),
    ("tokenizer_config.json", "[1, 2]", "tokenizer_config.json is not a JSON object"),
    ("tokenizer.model", "not a sentencepiece model", "cannot read .*tokenizer.model"),
])
def test_corrupt_tokenizer_files_are_one_line_errors(tmp_path, name, content, message):
    (tmp_path / name).write_text(content)
    if name == "tokenizer_config.json":
        (tmp_path / "tokenizer.model").write_text("unused: the config is read first")
    with pytest.raises(CheckpointError, match=message):
        Tokenizer(tmp_path)


@pytest.mark.parametrize("template,message", [
    ("{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}", "took over 5 s to render"),
    ("{{ 1 / 0 }}", "failed: ZeroDivisionError"),
    ("{{ messages[5]['content'] }}", "failed: UndefinedError"),
    ("{{ raise_exception('only user turns') }}", "chat template: only user turns"),
])
def test_a_chat_template_that_hangs_or_raises_is_refused(sentencepiece_folder, tmp_path, template, message):
    (tmp_path / "tokenizer.model").write_bytes((sentencepiece_folder / "tokenizer.model").read_bytes())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": template}))
    with pytest.raises(CheckpointError, match=message):
        Tokenizer(tmp_path).apply_chat_template([{"role": "user", "content": "x"}])
