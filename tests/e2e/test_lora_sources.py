"""Where a LoRA may come from (ovis_server.inputs.loras): the operator's folder, the hub
(tests/e2e/fake_hub.py on 127.0.0.1) and https URLs (a real server on 127.0.0.1, with the
operator's opt-ins), judged at submit, obtained by the worker into a bounded cache, and
never anything but safetensors."""

from __future__ import annotations

import asyncio
import json
import os
import pickle
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from ovis_server.inputs.fetch import FetchPolicy
from ovis_server.inputs.loras import (
    LoraCache,
    LoraFileError,
    LoraPolicy,
    LoraSource,
    LoraSourceError,
    check_safetensors,
    local_names,
    obtain,
    parse_source,
)

from .fake_hub import FakeHub
from .helpers import REFUSED_URLS
from .test_image_inputs import body, serving

MB = 1 << 20


def lora_file(path: Path, rank: int = 2) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"lora_A.weight": torch.zeros(rank, 8), "lora_B.weight": torch.zeros(8, rank)}, path)
    return path


@pytest.fixture
def policy(tmp_path: Path) -> LoraPolicy:
    lora_file(tmp_path / "loras" / "watercolour.safetensors")
    (tmp_path / "loras" / "notes.txt").write_text("not a LoRA")
    return LoraPolicy(
        tmp_path / "loras",
        frozenset({"hub", "url"}),
        FetchPolicy(max_bytes=MB, allow_private=True, allow_http=True, total_seconds=5),
    )


def test_the_operators_loras_are_listed_by_name(policy: LoraPolicy) -> None:
    assert local_names(policy.loras_dir) == ["watercolour"]
    assert parse_source("watercolour", policy) == LoraSource("local", "watercolour")


@pytest.mark.parametrize(
    ("path", "why"),
    [
        ("oil-paint", "no LoRA called 'oil-paint'"),
        ("notes", "no LoRA called"),
        ("../secrets", "must be a LoRA name"),
        ("owner/repo/../../etc.safetensors", "must be a LoRA name"),
        ("owner/repo/model.bin", "safetensors"),
        ("https://example.com/lora.ckpt", "safetensors"),
        ("https://example.com/lora.pt?x=1", "safetensors"),
        ("https://example.com/lora.zip", "URL of a .safetensors file"),
        ("owner/repo/readme.md", "name a .safetensors file"),
        ("", "must be a LoRA name"),
    ],
)
def test_paths_that_name_no_usable_lora_are_refused(
    policy: LoraPolicy, path: str, why: str
) -> None:
    with pytest.raises(LoraSourceError, match=why):
        parse_source(path, policy)


def test_downloads_are_off_unless_the_operator_allows_them(policy: LoraPolicy) -> None:
    closed = LoraPolicy(policy.loras_dir)
    with pytest.raises(LoraSourceError, match="from the hub are off"):
        parse_source("alibaba-pai/some-lora", closed)
    with pytest.raises(LoraSourceError, match="from URLs are off"):
        parse_source("https://example.com/x.safetensors", closed)
    assert parse_source("watercolour", closed).kind == "local"
    assert parse_source("alibaba-pai/some-lora", policy) == LoraSource(
        "hub", "alibaba-pai/some-lora"
    )


@pytest.mark.parametrize("url", REFUSED_URLS)
def test_every_refused_address_form_is_refused_as_a_lora_url(url: str, tmp_path: Path) -> None:
    strict = LoraPolicy(tmp_path, frozenset({"url"}), FetchPolicy(max_bytes=MB, allow_http=True))
    with pytest.raises(LoraSourceError):
        parse_source(url.rstrip("/") + ".safetensors", strict)


def test_a_pickle_renamed_safetensors_is_refused(tmp_path: Path) -> None:
    fake = tmp_path / "evil.safetensors"
    fake.write_bytes(pickle.dumps({"weight": [1.0, 2.0]}))
    with pytest.raises(LoraFileError, match="not a safetensors"):
        check_safetensors(fake, MB)


def test_a_header_pointing_past_the_file_is_refused(tmp_path: Path) -> None:
    header = json.dumps({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 4096]}}).encode()
    path = tmp_path / "short.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + bytes(16))
    with pytest.raises(LoraFileError, match="outside"):
        check_safetensors(path, MB)
    check_safetensors(lora_file(tmp_path / "fine.safetensors"), MB)


def test_a_url_lora_is_downloaded_once_into_the_cache(policy: LoraPolicy, tmp_path: Path) -> None:
    data = lora_file(tmp_path / "served.safetensors").read_bytes()
    calls: list[int] = []

    def answer(handler: object) -> None:
        calls.append(1)
        body(data)(handler)  # type: ignore[arg-type]

    cache = LoraCache(tmp_path / "cache", 10 * MB)
    with serving(answer) as url:
        source = parse_source(f"{url}/style.safetensors", policy)
        first = asyncio.run(obtain(source, policy, cache))
        again = asyncio.run(obtain(source, policy, cache))
    assert first == again
    assert first.read_bytes() == data
    assert calls == [1]


def test_a_url_answering_a_pickle_fails_the_download_and_caches_nothing(
    policy: LoraPolicy, tmp_path: Path
) -> None:
    cache = LoraCache(tmp_path / "cache", 10 * MB)
    with serving(body(pickle.dumps({"w": 1}))) as url:
        source = parse_source(f"{url}/style.safetensors", policy)
        with pytest.raises(LoraFileError, match="not a safetensors"):
            asyncio.run(obtain(source, policy, cache))
    assert list(cache.folder.glob("*")) == []


def test_a_url_lora_over_the_size_cap_is_refused(policy: LoraPolicy, tmp_path: Path) -> None:
    cache = LoraCache(tmp_path / "cache", 10 * MB)
    with serving(body(bytes(2 * MB))) as url:
        source = parse_source(f"{url}/big.safetensors", policy)
        with pytest.raises(LoraFileError, match="larger than"):
            asyncio.run(obtain(source, policy, cache))


def test_a_hub_lora_is_downloaded_from_the_hub(policy: LoraPolicy, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    lora_file(repo / "pytorch_lora_weights.safetensors")
    (repo / "README.md").write_text("a LoRA")
    cache = LoraCache(tmp_path / "cache", 10 * MB)
    with FakeHub("acme/style-lora", repo) as hub:
        source = parse_source("acme/style-lora", policy)
        path = asyncio.run(obtain(source, policy, cache, hub.url))
        assert path.read_bytes() == (repo / "pytorch_lora_weights.safetensors").read_bytes()
        missing = parse_source("acme/style-lora/other.safetensors", policy)
        with pytest.raises(LoraFileError, match=r"no file other\.safetensors"):
            asyncio.run(obtain(missing, policy, cache, hub.url))


def test_the_cache_drops_the_least_recently_used(tmp_path: Path) -> None:
    cache = LoraCache(tmp_path / "cache", 4 * 1024)
    cache.folder.mkdir()
    kept = []
    for index in range(4):
        download = tmp_path / f"d{index}.safetensors"
        download.write_bytes(bytes([index]) * 1024)
        kept.append(
            cache.add(LoraSource("url", f"https://x.example/{index}.safetensors"), download)
        )
        os.utime(kept[-1], (index, index))  # older first
    assert cache.find(LoraSource("url", "https://x.example/0.safetensors")) == kept[0]  # used
    cache.max_bytes = 3 * 1024
    removed = cache.trim()
    assert removed == [kept[1]]
    assert sorted(cache.folder.iterdir()) == sorted([kept[0], kept[2], kept[3]])
