"""Caption sidecar parsing (SRT, VTT, CSV, TXT, JSON) on well-formed and broken files, and clip_captions."""

from __future__ import annotations

import logging
import math

import pytest

from data_prep.captions import (
    WHOLE_VIDEO_END,
    clip_captions,
    find_caption_sidecar,
    parse_caption_file,
    parse_captions,
)
from data_prep.sources import Caption


def _write(tmp_path, name, data):
    path = tmp_path / name
    if isinstance(data, str):
        data = data.encode("utf-8")
    path.write_bytes(data)
    return path


def test_srt_basic(tmp_path):
    path = _write(
        tmp_path, "a.srt", "1\n00:00:01,000 --> 00:00:02,500\nhello\nworld\n\n2\n00:00:03,250 --> 00:00:04,000\nbye\n"
    )
    assert parse_captions(path) == [Caption(1.0, 2.5, "hello world"), Caption(3.25, 4.0, "bye")]


def test_srt_bom_crlf_missing_index_and_missing_blank_line(tmp_path):
    text = (
        "\ufeff1\r\n00:00:01,000 --> 00:00:02,000\r\nfirst\r\n\r\n"
        "00:00:03,000 --> 00:00:04,000\r\nno index line\r\n"
        "3\r\n00:00:05,000 --> 00:00:06,000\r\nno blank line before\r\n"
    )
    res = parse_caption_file(_write(tmp_path, "b.srt", text))
    assert [c.text for c in res.captions] == ["first", "no index line", "no blank line before"]
    assert [c.start for c in res.captions] == [1.0, 3.0, 5.0]
    assert res.skipped == 0 and res.encoding == "utf-8"


def test_srt_malformed_blocks_are_skipped_and_counted(tmp_path, caplog):
    text = (
        "1\n00:00:01,000 --> 00:00:02,000\nkeep me\n\n"
        "stray text with no timing\n\n"
        "2\n00:00:xx,000 --> 00:00:03,000\nbad time\n\n"
        "3\n00:00:05,000 --> 00:00:04,000\nends before it starts\n\n"
        "4\n00:00:06,000 --> 00:00:07,000\n\n"
        "5\n00:00:08,000 --> 00:00:09,000\nalso kept\n"
    )
    with caplog.at_level(logging.WARNING):
        res = parse_caption_file(_write(tmp_path, "c.srt", text))
    assert [c.text for c in res.captions] == ["keep me", "also kept"]
    assert res.skipped == 4
    assert "skipped 4 malformed" in caplog.text


def test_srt_tags_and_entities_are_stripped(tmp_path):
    path = _write(
        tmp_path, "d.srt", "1\n00:00:01,000 --> 00:00:02,000\n{\\an8}<i>Tom &amp; <font color='red'>Jerry</font></i>\n"
    )
    assert parse_captions(path) == [Caption(1.0, 2.0, "Tom & Jerry")]


def test_vtt_header_note_style_and_cue_settings(tmp_path):
    text = (
        "WEBVTT - a title\nKind: captions\nLanguage: en\n\n"
        "STYLE\n::cue { color: yellow }\n\n"
        "NOTE this is\na comment\n\n"
        "intro-cue\n00:01.000 --> 00:02.500 align:start position:10%\n<v Bob>Hello</v> <c.big>there</c>\n\n"
        "01:00:00.000 --> 01:00:01.000\n<00:00:00.500>late\n"
    )
    res = parse_caption_file(_write(tmp_path, "e.vtt", text))
    assert res.captions == [Caption(1.0, 2.5, "Hello there"), Caption(3600.0, 3601.0, "late")]
    assert res.skipped == 0


def test_latin1_fallback_is_logged(tmp_path, caplog):
    path = _write(tmp_path, "f.srt", "1\n00:00:01,000 --> 00:00:02,000\nCafé crème\n".encode("latin-1"))
    with caplog.at_level(logging.INFO):
        res = parse_caption_file(path)
    assert res.encoding == "latin-1"
    assert res.captions[0].text == "Café crème"
    assert "Latin-1" in caplog.text


@pytest.mark.parametrize("name", ["empty.srt", "empty.vtt", "empty.csv", "empty.txt", "empty.json"])
def test_empty_file_gives_no_captions_and_a_warning(tmp_path, caplog, name):
    with caplog.at_level(logging.WARNING):
        assert parse_captions(_write(tmp_path, name, "")) == []
    assert "no usable captions" in caplog.text or "unparseable" in caplog.text


def test_binary_garbage_does_not_crash(tmp_path):
    path = _write(tmp_path, "g.vtt", bytes(range(256)) * 4)
    res = parse_caption_file(path)
    assert res.captions == [] and res.skipped >= 1


def test_csv_howto100m_style_with_and_without_header(tmp_path):
    with_header = _write(tmp_path, "h.csv", 'start,end,text\n0.5,2.0,"crack, then whisk"\n2.0,bad,x\n3,4,\n5,6,last\n')
    res = parse_caption_file(with_header)
    assert res.captions == [Caption(0.5, 2.0, "crack, then whisk"), Caption(5.0, 6.0, "last")]
    assert res.skipped == 2
    no_header = _write(tmp_path, "i.csv", "1,2,one\n")
    assert parse_captions(no_header) == [Caption(1.0, 2.0, "one")]


def test_txt_lines_span_the_whole_video(tmp_path):
    path = _write(tmp_path, "j.txt", "a person juggles\n\n  <b>three</b> balls  \n")
    caps = parse_captions(path)
    assert [c.text for c in caps] == ["a person juggles", "three balls"]
    assert all(c.start == 0.0 and c.end == WHOLE_VIDEO_END for c in caps)


def test_json_shapes(tmp_path):
    as_list = _write(tmp_path, "k.json", '[{"start": 1, "end": 2, "text": "a"}, {"start": "x", "end": 3, "text": "b"}]')
    res = parse_caption_file(as_list)
    assert res.captions == [Caption(1.0, 2.0, "a")] and res.skipped == 1
    wrapped = _write(
        tmp_path, "l.json", '{"label": "cooking", "captions": [{"start": 0, "end": 1, "text": "x"}, "whole"]}'
    )
    res = parse_caption_file(wrapped)
    assert res.label == "cooking"
    assert res.captions == [Caption(0.0, 1.0, "x"), Caption(0.0, math.inf, "whole")]
    broken = _write(tmp_path, "m.json", '{"captions": [')
    res = parse_caption_file(broken)
    assert res.captions == [] and res.error is not None


def test_unsupported_extension_is_an_error(tmp_path):
    with pytest.raises(ValueError, match=r"\.ass"):
        parse_captions(_write(tmp_path, "n.ass", "x"))


def test_clip_captions_clips_retimes_and_drops():
    caps = [
        Caption(0.0, 1.0, "before"),
        Caption(1.5, 3.0, "straddles start"),
        Caption(3.0, 4.0, "inside"),
        Caption(4.5, 6.0, "straddles end"),
        Caption(5.0, 7.0, "at end"),
        Caption(0.0, WHOLE_VIDEO_END, "whole video"),
        Caption(100.0, 101.0, "after the video"),
    ]
    out = clip_captions(caps, 2.0, 5.0)
    assert out == [
        Caption(0.0, 1.0, "straddles start"),
        Caption(1.0, 2.0, "inside"),
        Caption(2.5, 3.0, "straddles end"),
        Caption(0.0, 3.0, "whole video"),
    ]
    with pytest.raises(ValueError):
        clip_captions(caps, 3.0, 3.0)


def test_find_caption_sidecar_prefers_exact_stem_then_english(tmp_path):
    video = _write(tmp_path, "clip.mp4", b"\0")
    assert find_caption_sidecar(video) is None
    _write(tmp_path, "clip.de.vtt", "WEBVTT\n")
    _write(tmp_path, "clip.en-US.vtt", "WEBVTT\n")
    _write(tmp_path, "clip.backup.old.srt", "x")  # not a language tag
    assert find_caption_sidecar(video).name == "clip.en-US.vtt"
    _write(tmp_path, "clip.txt", "x")
    assert find_caption_sidecar(video).name == "clip.txt"
    _write(tmp_path, "clip.srt", "x")
    assert find_caption_sidecar(video).name == "clip.srt"
