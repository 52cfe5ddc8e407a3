"""Bad config files (issue 16): whatever a file holds, loading raises only ConfigError and
says what is wrong in one short line per problem, naming the key; `config check` and `up`
print those lines and exit 1 without a traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from ikefarm.shared.config.loader import (
    MAX_FILE_SIZE,
    MAX_NESTING,
    ConfigError,
    load_config,
    nesting_depth,
    parse_config,
)
from ikefarm.shared.config.tree import MAX_PROBLEMS

EXAMPLE = Path(__file__).resolve().parents[2] / "ops" / "examples" / "psk-responder.toml"
IKEFARM = Path(sys.executable).parent / "ikefarm"
MAX_LINE = 2048  # an error line, whatever the input


def refusal(text: str) -> str:
    with pytest.raises(ConfigError) as refused:
        parse_config(text)
    message = str(refused.value)
    assert all(len(line) < MAX_LINE for line in message.splitlines()), message[:4096]
    return message


def file_refusal(path: Path) -> str:
    with pytest.raises(ConfigError) as refused:
        load_config(path)
    message = str(refused.value)
    assert all(len(line) < MAX_LINE for line in message.splitlines()), message[:4096]
    return message


def test_binary_file_is_refused_as_binary(tmp_path: Path) -> None:
    path = tmp_path / "bin.toml"
    path.write_bytes(b"[nats]\nurl = ''\n" + bytes(range(256)) * 32)
    message = file_refusal(path)
    assert "<file>: a binary file, not TOML text: NUL byte at line 3, column 1" in message


def test_invalid_utf8_in_a_string_names_line_and_offset(tmp_path: Path) -> None:
    data = EXAMPLE.read_bytes().replace(b'name = "rw"', b'name = "r\xff\xfew"')
    offset = data.index(b"\xff")
    path = tmp_path / "latin.toml"
    path.write_bytes(data)
    message = file_refusal(path)
    line = data.count(b"\n", 0, offset) + 1
    assert f"not UTF-8: invalid byte at line {line}, column 10 (byte offset {offset})" in message
    assert "\xff" not in message


def test_oversize_file_is_refused_before_parsing(tmp_path: Path) -> None:
    path = tmp_path / "big.toml"
    path.write_bytes(b"# " + b"x" * MAX_FILE_SIZE + b"\n")
    assert "<file>: larger than 4 MiB" in file_refusal(path)


def test_unreadable_paths_are_config_errors(tmp_path: Path) -> None:
    assert "<file>: cannot read: No such file or directory" in file_refusal(tmp_path / "absent")
    assert "<file>: cannot read: Is a directory" in file_refusal(tmp_path)


def test_control_characters_render_as_toml_escapes() -> None:
    config = parse_config('[[ike.ike-policy-template]]\nname = "a\\nb\\u0001\\\\c\\u2028"\n')
    assert 'name = "a\\u000ab\\u0001\\\\c\u2028"' in config.render()
    assert parse_config(config.render()).ike.ike_policy_template[0].name == "a\nb\x01\\c\u2028"


def test_toml_syntax_error_gives_line_and_column() -> None:
    message = refusal("[ike.global-options]\nretransmit-tries = = 3\n")
    assert "<toml>: Invalid value (at line 2, column 20)" in message


def test_integer_with_thousands_of_digits() -> None:
    assert "<toml>: a number has too many digits" in refusal("a = " + "9" * 5000 + "\n")


@pytest.mark.parametrize(
    ("opener", "closer"),
    [("[", "]"), ("{ a = ", " }"), ("[{ b = ", "}]")],
    ids=["arrays", "inline-tables", "mixed"],
)
def test_deep_nesting_is_refused_with_key_and_line(opener: str, closer: str) -> None:
    def nested(depth: int) -> str:
        levels = depth // (opener.count("[") + opener.count("{"))
        return "[ike.global-options]\nx = 1\nretransmit-tries = " + (
            opener * levels + "1" + closer * levels + "\n"
        )

    message = refusal(nested(5000))
    assert message.count("\n") == 1, message
    assert (
        f"ike.global-options.retransmit-tries: arrays or inline tables nested deeper than "
        f"{MAX_NESTING} levels (line 3)" in message
    )
    # at the limit the file parses, and the value itself is what is refused
    shallow = refusal(nested(MAX_NESTING))
    assert "nested deeper" not in shallow and "ike.global-options.x: unknown key" in shallow


def test_brackets_inside_strings_and_comments_do_not_count() -> None:
    text = (
        '[[ike.vpn]] # [[[[\nname = "[[[[{{{{"\n'
        "local-id = '[[[['\n"
        'remote-id = """\n[[[[\\"""[[["""\n'
        "local-certificate = '''[[[[''''\n"
        'vip-pool = ["a]", "[b"]\n'
    )
    assert nesting_depth(text, MAX_NESTING) == (2, 0, "")
    assert nesting_depth("a = [[[[1]]]]", 3) == (4, 1, "a")
    assert nesting_depth('[x."y]"]\nz = [[[[1]]]]', 3) == (4, 2, 'x."y]".z')


def test_huge_list_is_named_by_its_length() -> None:
    message = refusal("[ingress]\nlisten = [" + ",".join(["1"] * 100_000) + "]\n")
    assert "ingress.listen: [... 100000 items] has more than the 1024 items allowed" in message, (
        message
    )
    assert len(message) < 200


def test_bad_list_item_is_shown_not_the_list() -> None:
    listen = ", ".join(['"192.0.2.1"'] * 20 + ['"bogus"'])
    message = refusal(f"[ingress]\nlisten = [{listen}]\n")
    assert 'ingress.listen: [... 21 items] item 20 "bogus" is not an IP address' in message


def test_long_values_and_keys_are_cut_with_their_length() -> None:
    name = "n" * 100_000
    message = refusal(
        f'[[ike.vpn]]\nname = "{name}"\nlocal-address = "{"y" * 5000}"\n'
        f'"{"k" * 100_000}" = 1\nvip-pool = ["{name}"]\n'
    )
    assert "(5000 characters) is not an IP address" in message
    assert '"kkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkk..." (100000 characters): unknown key' in message
    assert 'ike.vpn[0].vip-pool: "nnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnn..." (100000 characters)' in (
        message
    )
    assert len(message) < 8 * MAX_LINE


def test_control_characters_stay_on_one_line() -> None:
    message = refusal('[ike.global-options]\ninstall-vip-on = 3\n"a\\nb\\u2028c" = "x\\ny"\n')
    assert message.count("\n") == 2, message
    assert 'ike.global-options."a\\nb\\u2028c": unknown key' in message


def test_problems_beyond_the_cap_are_counted() -> None:
    listen = ", ".join(['"::"'] * 1000)
    message = refusal(f"[ingress]\nlisten = [{listen}]\n")
    assert message.count("is a wildcard") == MAX_PROBLEMS
    assert f"... and {1000 - MAX_PROBLEMS} more problem(s) not shown" in message
    many_keys = "".join(f"k{i} = 1\n" for i in range(5000))
    message = refusal("[ike.global-options]\n" + many_keys)
    assert "1 configuration error" not in message and message.count("unknown key") == MAX_PROBLEMS


def test_table_arrays_are_bounded() -> None:
    message = refusal("[ike]\nvpn = [" + ", ".join(["{}"] * 10_001) + "]\n")
    assert "ike.vpn: [... 10001 items] has more than the 10000 items allowed" in message


# --- through the real command ------------------------------------------------------------


def bad_files(directory: Path) -> dict[str, tuple[Path, str]]:
    """Each issue-16 input and the line its refusal must print."""
    example = EXAMPLE.read_text()
    files = {
        "binary": (os.urandom(8192).replace(b"\0", b"\1") + b"\0", "<file>: "),
        "utf8": (EXAMPLE.read_bytes().replace(b'"rw"', b'"r\xc3w"'), "not UTF-8: invalid byte"),
        "deep-arrays": ("a = " + "[" * 5000 + "]" * 5000 + "\n", "nested deeper than"),
        "deep-tables": ("a = " + "{b = " * 5000 + "1" + "}" * 5000 + "\n", "nested deeper than"),
        "million": (
            "[ingress]\nlisten = [" + ",".join(["1"] * 1_000_000) + "]\n",
            "ingress.listen: [... 1000000 items] has more than the 1024 items allowed",
        ),
        "nobody": (
            example.replace('name = "rw"', 'name = "rw"\nremote-id = "nobody.example"').replace(
                'local-id = "gw.example"\nremote-id = "peer.example"\nike-policy',
                'local-id = "gw.example"\nike-policy',
            ),
            'ike.vpn[0]: vpn "rw" authenticates by pre-shared key but no '
            '[[ike.pre-shared-key]] fits its local-id "gw.example" and remote-id '
            '"nobody.example"',
        ),
    }
    paths = {}
    for name, (content, expected) in files.items():
        path = directory / f"{name}.toml"
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)
        paths[name] = (path, expected)
    assert 'remote-id = "nobody.example"' in paths["nobody"][0].read_text()
    return paths


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(IKEFARM), *args], capture_output=True, text=True, timeout=120, env=env
    )


def assert_refused(result: subprocess.CompletedProcess[str], path: Path, expected: str) -> None:
    assert result.returncode == 1, result
    assert "Traceback" not in result.stderr and result.stdout == ""
    lines = result.stderr.splitlines()
    assert lines[0] == f"{path}: {len(lines) - 1} configuration error(s)", lines[0]
    assert all(len(line) < MAX_LINE for line in lines), result.stderr[:4096]
    assert expected in result.stderr, result.stderr


@pytest.fixture(scope="module")
def issue_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, str]]:
    return bad_files(tmp_path_factory.mktemp("bad"))


def test_the_example_config_checks() -> None:
    result = run("config", "check", str(EXAMPLE))
    assert result.returncode == 0 and "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "name", ["binary", "utf8", "deep-arrays", "deep-tables", "million", "nobody"]
)
def test_config_check_refuses_bad_files(
    name: str, issue_files: dict[str, tuple[Path, str]]
) -> None:
    path, expected = issue_files[name]
    assert_refused(run("config", "check", str(path)), path, expected)


def test_up_with_a_symlink_loop_is_refused(tmp_path: Path) -> None:
    loop = tmp_path / "loop.toml"
    loop.symlink_to(loop)
    env = {**os.environ, "IKEFARM_STATE_DIR": str(tmp_path / "state")}
    result = run("up", "-c", str(loop), env=env)
    assert_refused(result, loop, "<file>: cannot read: Too many levels of symbolic links")
    assert not (tmp_path / "state").exists()


@pytest.mark.parametrize("name", ["binary", "utf8", "deep-tables", "million", "nobody"])
def test_up_refuses_bad_files_before_starting_anything(
    name: str, issue_files: dict[str, tuple[Path, str]], tmp_path: Path
) -> None:
    path, expected = issue_files[name]
    state = tmp_path / "state"
    env = {**os.environ, "IKEFARM_STATE_DIR": str(state)}
    assert_refused(run("up", "-c", str(path), env=env), path.resolve(), expected)
    assert not state.exists(), "up made its state directory: it started something"
