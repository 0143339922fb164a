"""``xla-cache-patch profile``'s XSpace reader, on a hand-built trace (no torch_xla, no protobuf)."""

from __future__ import annotations

from xla_cache_patch.tools import cli, profile


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _int(field: int, value: int) -> bytes:
    return _varint(field << 3) + _varint(value)


def _msg(field: int, payload: bytes) -> bytes:
    return _varint(field << 3 | 2) + _varint(len(payload)) + payload


def _plane(names: dict[int, str], lines: dict[str, list[tuple[int, int]]]) -> bytes:
    plane = _msg(2, b"/host:CPU")
    for mid, name in names.items():
        plane += _msg(4, _int(1, mid) + _msg(2, _int(1, mid) + _msg(2, name.encode())))
    for line, events in lines.items():
        body = _msg(2, line.encode())
        for mid, ps in events:
            body += _msg(4, _int(1, mid) + _int(3, ps))
        plane += _msg(3, body)
    return _msg(1, plane)


def test_ops_are_grouped_by_kind_on_xla_threads_and_nested_events_are_left_out() -> None:
    names = {1: "dot.12", 2: "dot.7", 3: "copy_dot_fusion.3.clone", 4: "call.61", 5: "ThunkExecutor::Execute"}
    trace = _plane(
        names,
        {
            "tf_XLAEigen/-1011": [(1, 3_000_000_000), (3, 2_000_000_000), (4, 2_000_000_000)],
            "tf_XLAEigen/-7598": [(2, 1_000_000_000), (5, 9_000_000_000)],
            "python": [(1, 50_000_000_000)],  # host threads are not XLA's ops
        },
    )
    total, count = profile.op_times(trace)
    assert dict(total) == {"dot": 4_000_000_000, "copy_dot_fusion": 2_000_000_000}
    assert dict(count) == {"dot": 2, "copy_dot_fusion": 1}
    table = profile.format_table(total, count, steps=2, top=5).splitlines()
    assert table[2] == "| dot | 2.00 | 66.7% | 1.0 |"
    assert table[3] == "| copy_dot_fusion | 1.00 | 33.3% | 0.5 |"


def test_profile_is_a_cli_subcommand() -> None:
    args = cli.build_parser().parse_args(["profile", "--batch", "2", "--cache-len", "2048", "--no-fast-dots"])
    assert (args.command, args.model, args.batch, args.cache_len, args.no_fast_dots) == (
        "profile",
        "smollm2-135m",
        2,
        2048,
        True,
    )
