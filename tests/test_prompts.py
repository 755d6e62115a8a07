"""Prompt files in the three formats users have."""

from __future__ import annotations

import json
import logging

import pytest
from click.testing import CliRunner

from memedit.cli import cli
from memedit.errors import MemeditError
from memedit.prompts import empty_reference, quiet_tokenizer_warnings, read_prompts
from memedit.sampling import SamplingConfig, run_pipeline


def test_plain_text_skips_blank_lines(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("\ufeffa red cat\n\n  a blue dog  \n")
    prompts = read_prompts(path)
    assert prompts.prompts == ["a red cat", "a blue dog"] and prompts.name == "p"


def test_jsonl_like_wen_et_al(tmp_path):
    path = tmp_path / "sdv1_500_memorized.jsonl"
    path.write_text('{"caption": "Mothers influence", "index": 3, "image": "gt/3.png"}\n'
                    '{"prompt": "two", "images": ["a.png", "b.png"]}\n')
    prompts = read_prompts(path)
    assert prompts.prompts == ["Mothers influence", "two"]
    assert prompts.records[0].images == (tmp_path / "gt/3.png",)
    assert prompts.records[0].extra == {"index": 3}
    assert prompts.records[1].images == (tmp_path / "a.png", tmp_path / "b.png")


def test_csv_with_prompt_column(tmp_path):
    path = tmp_path / "p.csv"
    path.write_text('id,Prompt,image\n1,"a cat, sitting",x.png\n2,a dog,\n')
    prompts = read_prompts(path)
    assert prompts.prompts == ["a cat, sitting", "a dog"]
    assert prompts.records[0].images == (tmp_path / "x.png",) and prompts.records[1].images == ()


def test_hash_depends_on_prompts_only(tmp_path):
    (tmp_path / "a.txt").write_text("x\ny\n")
    (tmp_path / "b.csv").write_text("prompt\nx\ny\n")
    assert read_prompts(tmp_path / "a.txt").sha256 == read_prompts(tmp_path / "b.csv").sha256
    assert empty_reference(1).prompts == [""]


@pytest.mark.parametrize(
    ("name", "content", "prompts"),
    [("p.csv", "id;Prompt;image\n1;a cat, sitting;x.png\n2;a dog;\n", ["a cat, sitting", "a dog"]),
     ("p.csv", "prompt\timage\na cat, sitting\tx.png\n", ["a cat, sitting"]),
     ("p.tsv", "prompt|image\na cat\tsitting|x.png\n", ["a cat\tsitting"]),
     ("p.csv", " Caption ,image\na cat,x.png\n", ["a cat"]),
     ("p.csv", "PROMPT\na cat\n", ["a cat"]),
     ("p.csv", ",prompt,image\n0,a cat,x.png\n1,a dog,\n", ["a cat", "a dog"]),
     ("p.csv", "Unnamed: 0;prompt\n0;a cat\n", ["a cat"]),
     # One column whose prompts all hold a ';': the sniffer's ';' would cut them short.
     ("p.csv", "prompt\n" + "a cat; sitting\n" * 50, ["a cat; sitting"] * 50)],
    ids=["semicolon", "tab-in-csv", "pipe-in-tsv", "caption-spaces", "upper-case",
         "pandas-index", "pandas-index-read-back", "one-column-with-semicolons"],
)
def test_csv_as_published(tmp_path, name, content, prompts):
    path = tmp_path / name
    path.write_text(content)
    read = read_prompts(path)
    assert read.prompts == prompts
    assert not any(k in ("", "unnamed: 0") for k in read.records[0].extra)  # index: not data
    if "image" in content:
        assert read.records[0].images == (tmp_path / "x.png",)


@pytest.mark.parametrize(
    ("name", "content", "needles"),
    [("p.jsonl", '{"prompt": "a cat"}\n{"prompt": ""}\n', ["line 2", "`prompt` field is empty"]),
     ("p.jsonl", '{"caption": "  "}\n', ["line 1", "`caption` field is empty"]),
     ("p.jsonl", '{"prompt": "a cat"}\n\n{"prompt": 3}\n', ["line 3", "is a number"]),
     ("p.jsonl", '{"prompt": null, "caption": "a cat"}\n', ["line 1", "is null"]),
     ("p.jsonl", '{"prompt": ["a", "cat"]}\n', ["line 1", "is a list"]),
     ("p.jsonl", '{"prompt": {"en": "a cat"}}\n', ["line 1", "is an object"]),
     ("p.jsonl", '{"prompt": true}\n', ["line 1", "is a boolean"]),
     ("p.jsonl", '{"Prompt": "a cat"}\n', ["line 1", "['Prompt']", "prompt, caption, text"]),
     ("p.jsonl", "\n  \n\n", ["every line is blank"]),
     ("p.csv", "prompt,image\na cat,x.png\n,y.png\n", ["line 3", "`prompt` cell is empty"]),
     ("p.csv", "id,prompt\n1,a cat\n2\n", ["line 3", "`prompt` cell is empty"]),
     ("p.csv", "Prompt,image\n", ["no rows", "['prompt', 'image']"]),
     ("p.csv", "\n\n", ["every line is blank"]),
     ("p.csv", "id;name\n1;a cat\n", ["line 1", "['id', 'name']", "semicolon", "caption"]),
     ("p.csv", "prompt,image\na cat, sitting,x.png\n", ["line 2", "3 fields", "comma", "Quote"]),
     ("p.csv", "prompt,Prompt \na,b\n", ["line 1", "names a column twice"]),
     ("p.txt", "a cat\n\n" + "x" * 100_001 + "\n", ["line 3", "100,001 characters", "77 tokens"]),
     ("p.jsonl", json.dumps({"prompt": "x" * 120_000}), ["line 1", "120,000 characters"]),
     # Over the csv module's field limit (131,072): the csv error, still with line and hint.
     ("p.csv", "prompt\na cat\n" + "x" * 200_000 + "\n", ["line 3", "field limit", "77 tokens"])],
    ids=["empty-jsonl-prompt", "blank-jsonl-caption", "numeric-prompt", "null-prompt",
         "list-prompt", "object-prompt", "boolean-prompt", "no-prompt-key", "jsonl-blank-lines",
         "empty-csv-cell", "short-csv-row", "header-only-csv", "csv-blank-lines",
         "no-prompt-column", "unquoted-delimiter", "duplicate-column", "giant-txt-prompt",
         "giant-jsonl-prompt", "giant-csv-cell"],
)
def test_unusable_prompts_name_the_line(tmp_path, name, content, needles):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(MemeditError) as caught:
        read_prompts(path)
    for needle in needles:
        assert needle in str(caught.value)
    assert caught.value.hint


def test_describe_and_log_the_count(tmp_path, caplog):
    path = tmp_path / "mem.txt"
    path.write_text("a red cat\n\na blue dog\n")
    with caplog.at_level(logging.INFO, logger="memedit.prompts"):
        prompts = read_prompts(path)
    assert prompts.describe() == f"2 prompts from {path}"
    assert caplog.messages == [f"2 prompts from {path}"]
    assert empty_reference(1).describe() == "1 prompt (empty-prompt)"


def test_quiet_tokenizer_warnings_hides_the_truncated_text(tiny_pipe):
    # conftest silences both libraries; turn their warnings back on to see what users see. Their
    # handlers hold the stderr of import time, so collect the records with a handler of our own.
    seen: list[str] = []
    catcher = logging.Handler()
    catcher.emit = lambda record: seen.append(record.getMessage())
    libraries = [logging.getLogger(name) for name in ("diffusers", "transformers")]
    levels = [logger.level for logger in libraries]
    config = SamplingConfig(steps=1, guidance_scale=1.0)
    try:
        for logger in libraries:
            logger.setLevel(logging.WARNING)
            logger.addHandler(catcher)
        long_prompt = ["a red cat " * 100]
        with quiet_tokenizer_warnings():
            tiny_pipe(prompt=long_prompt, num_inference_steps=1, output_type="latent")
        assert seen == []
        # memedit's own sampling is quiet by itself ...
        run_pipeline(tiny_pipe, long_prompt, [0], config, output_type="latent")
        assert seen == []
        # ... and the levels are restored afterwards.
        tiny_pipe(prompt=long_prompt, num_inference_steps=1, output_type="latent")
        assert any("a red cat" in message for message in seen)
    finally:
        for logger, level in zip(libraries, levels, strict=True):
            logger.setLevel(level)
            logger.removeHandler(catcher)


@pytest.mark.parametrize(
    ("name", "content", "needle"),
    [("mem.jsonl", b'{"prompt": "a cat"}\n{"prompt": 7}\n', "line 2"),
     ("mem.csv", b"Prompt;image\n", "no rows"),
     ("mem.csv", b"id,name\n1,a cat\n", "no prompt column")],
    ids=["numeric-prompt", "header-only", "no-prompt-column"],
)
def test_cli_refuses_bad_prompt_file(tiny_model_dir, tmp_path, name, content, needle):
    path = tmp_path / name
    path.write_bytes(content)
    result = CliRunner().invoke(cli, ["locate", "--model", str(tiny_model_dir), "--memorized",
                                      str(path), "--out", str(tmp_path / "sub"), "--steps", "4",
                                      "--tau", "2", "--k", "0.05"])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and needle in result.output
    assert path.read_bytes() == content
    assert not (tmp_path / "sub").exists()  # no empty subspace
