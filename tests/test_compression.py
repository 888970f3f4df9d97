"""Wire codecs of the averager, on their own: sizes, round trips within the documented bounds,
and clear errors for data that does not fit."""

import math

import pytest
import torch

from hivecli import ConfigError
from hivecli.averaging import (
    Blockwise8BitQuantization,
    Codec,
    Float16Compression,
    NoCompression,
    Uniform8BitQuantization,
    get_codec,
)
from hivecli.averaging.compression import CODECS, AutoCompression
from hivecli.averaging.link import LinkMeter

SIZES = [1, 2, 1000, 4095, 4096, 4097, 10_000]


def documented_bound(codec, chunk):
    """The error bound each codec's docstring promises, per element."""
    if isinstance(codec, NoCompression):
        return torch.zeros_like(chunk)
    if isinstance(codec, Float16Compression):
        return chunk.abs() * 2**-11 + 2**-24  # plus half of fp16's smallest subnormal step
    if isinstance(codec, Uniform8BitQuantization):
        span = (chunk.max() - chunk.min()).item() if chunk.numel() else 0.0
        return torch.full_like(chunk, span / 510 * (1 + 1e-5) + 1e-6)
    if isinstance(codec, Blockwise8BitQuantization):
        blocks = math.ceil(chunk.numel() / codec.block)
        padded = torch.nn.functional.pad(chunk.abs(), (0, blocks * codec.block - chunk.numel()))
        absmax = padded.view(blocks, codec.block).amax(1)
        return (absmax / 254 * (1 + 1e-5) + 1e-6).repeat_interleave(codec.block)[: chunk.numel()]
    raise AssertionError(codec)


@pytest.fixture(params=sorted(CODECS), ids=sorted(CODECS))
def codec(request):
    return get_codec(request.param)


@pytest.mark.parametrize("numel", SIZES)
def test_round_trip_within_the_documented_bound(codec, numel):
    gen = torch.Generator().manual_seed(numel)
    chunk = torch.randn(numel, generator=gen) * 5 + 2
    chunk[numel // 2] = 40.0  # an outlier: blockwise only loses precision in its own block
    meta, data = codec.encode(chunk)
    assert isinstance(data, memoryview) and data.nbytes == codec.encoded_nbytes(numel)
    decoded = codec.decode(meta, data, numel)
    assert decoded.dtype == torch.float32 and decoded.shape == (numel,)
    error = (decoded - chunk).abs()
    bound = documented_bound(codec, chunk)
    assert (error <= bound).all(), f"{codec.name}: error {error.max().item()} at {error.argmax().item()}"
    if codec.name == "none":
        assert torch.equal(decoded, chunk)


def test_decode_accepts_read_only_bytes(codec):
    chunk = torch.linspace(-3, 3, 5000)
    meta, data = codec.encode(chunk)
    from_bytes = codec.decode(meta, memoryview(bytes(data)), 5000)  # e.g. a message body
    torch.testing.assert_close(from_bytes, codec.decode(meta, data, 5000), rtol=0, atol=0)


def test_encoded_size_depends_only_on_the_element_count(codec):
    for numel in SIZES:
        sizes = {codec.encode(torch.full((numel,), value))[1].nbytes for value in (0.0, -7.5, 1e6)}
        assert sizes == {codec.encoded_nbytes(numel)}
    assert get_codec("none").encoded_nbytes(10) == 40
    assert get_codec("fp16").encoded_nbytes(10) == 20
    assert get_codec("uniform8bit").encoded_nbytes(10) == 10
    assert get_codec("blockwise8bit").encoded_nbytes(10) == 14
    assert get_codec("blockwise8bit").encoded_nbytes(4097) == 4097 + 8


@pytest.mark.parametrize("delta", [-1, 1])
def test_data_of_the_wrong_size_is_a_value_error(codec, delta):
    meta, data = codec.encode(torch.randn(100))
    wrong = memoryview(bytearray(data.nbytes + delta))
    with pytest.raises(ValueError, match="bytes"):
        codec.decode(meta, wrong, 100)
    with pytest.raises(ValueError):
        codec.decode(meta, data, 100 + delta)


@pytest.mark.parametrize("meta", [None, [], [1.0], ["a", 1.0], [1.0, 2.0, 3.0], {"low": 0}])
def test_uniform8bit_rejects_bad_metadata(meta):
    codec = Uniform8BitQuantization()
    _, data = codec.encode(torch.randn(10))
    with pytest.raises(ValueError, match="metadata"):
        codec.decode(meta, data, 10)


def test_constant_and_zero_chunks_are_exact(codec):
    for value in (0.0, 3.25, -1.5):
        chunk = torch.full((5000,), value)
        meta, data = codec.encode(chunk)
        assert torch.equal(codec.decode(meta, data, 5000), chunk), (codec.name, value)


def test_fp16_saturates_instead_of_overflowing():
    codec = Float16Compression()
    chunk = torch.tensor([1e6, -1e6, 1.0])
    decoded = codec.decode(*codec.encode(chunk), 3)
    limit = torch.finfo(torch.float16).max
    assert decoded.tolist() == [limit, -limit, 1.0]
    assert torch.isfinite(decoded).all()


def test_encode_does_not_modify_its_input(codec):
    chunk = torch.randn(3000)
    before = chunk.clone()
    codec.encode(chunk)
    assert torch.equal(chunk, before)


@pytest.mark.parametrize(
    ("name", "cls"),
    [
        (None, NoCompression),
        ("none", NoCompression),
        ("fp16", Float16Compression),
        ("FP16", Float16Compression),
        ("float16", Float16Compression),
        ("uniform8bit", Uniform8BitQuantization),
        ("uniform_8bit", Uniform8BitQuantization),
        ("blockwise8bit", Blockwise8BitQuantization),
        ("blockwise-8bit", Blockwise8BitQuantization),
        ("8bit", Blockwise8BitQuantization),
    ],
)
def test_get_codec_by_name(name, cls):
    codec = get_codec(name)
    assert type(codec) is cls and isinstance(codec, Codec)


def test_get_codec_passes_instances_through():
    codec = Uniform8BitQuantization()
    assert get_codec(codec) is codec


@pytest.mark.parametrize("name", ["nope", "int8", "", "fp32"])
def test_unknown_codec_is_a_config_error_naming_it(name):
    with pytest.raises(ConfigError) as info:
        get_codec(name)
    message = str(info.value)
    assert repr(name) in message
    assert all(known in message for known in CODECS)


# ---- compression = "auto" and the link meter ---------------------------------------------------


def auto_with(pairs_per_second: float) -> AutoCompression:
    auto = get_codec("auto")
    assert isinstance(auto, AutoCompression) and get_codec(auto) is auto
    auto._pairs_per_second = pairs_per_second  # as if measured: the rule, not this machine, is tested
    return auto


def test_auto_is_exact_until_the_link_is_measured_then_compresses_only_slow_links():
    auto = auto_with(2e8)  # fp16 pays below 2 x 2e8 = 400 MB/s
    assert auto.choose(None) == "none"
    assert auto.choose(11.8e6) == "fp16"  # 100 Mbit/s
    assert auto.choose(125e6) == "fp16"  # 1 Gbit/s
    assert auto.choose(1.1e9) == "none"  # loopback on 2 cores
    assert auto.conversion_seconds("none", 10**8) == 0.0
    assert auto.conversion_seconds("fp16", 10**8) == pytest.approx(0.25)


def test_link_meter_smooths_rounds_and_does_not_mistake_conversions_for_a_slow_link():
    meter = LinkMeter()
    assert meter.rate is None and meter.chunk_bytes(8 << 20) == 8 << 20  # nothing measured: the setting
    meter.observe(4096, 0.5)  # too small to say anything of the link: latency, not bandwidth
    assert meter.rate is None
    # a loopback round in fp16: 100 MB sent in 0.4 s, 0.25 s of which were conversions
    meter.observe(100_000_000, 0.4, busy_seconds=0.25)
    assert meter.rate == pytest.approx(100e6 / 0.15)
    slow = LinkMeter()
    slow.observe(40_000_000, 3.4)  # 100 Mbit/s
    assert slow.rate == pytest.approx(40e6 / 3.4)
    assert slow.chunk_bytes(8 << 20) == int(40e6 / 3.4 * 0.05) // 4096 * 4096  # 50 ms of the link
    for _ in range(10):  # the link got fast: the smoothed rate follows within a few rounds
        slow.observe(100_000_000, 0.1)
    assert slow.rate > 0.9e9 and slow.chunk_bytes(8 << 20) == 8 << 20
    assert LinkMeter().chunk_bytes(100_000) == 100_000  # never above the setting


def test_auto_measures_this_machines_conversion_speed():
    auto = get_codec("auto")
    assert isinstance(auto, AutoCompression)
    assert 1e6 < auto.pairs_per_second() < 1e12  # a real measurement, once
    assert auto.pairs_per_second() == auto._pairs_per_second
