"""Prompt files in the three formats users have."""

from __future__ import annotations

from memedit.prompts import empty_reference, read_prompts


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
