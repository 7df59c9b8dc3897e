"""Signed bundles: Ed25519 over manifest.json. A tier loads a bundle only when a key it trusts
signed exactly the manifest it reads; every refusal starts with its reason."""
from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from fogsplit.cli import build_parser, main
from fogsplit.core.config import load_config
from fogsplit.core.errors import BundleError, ConfigError
from fogsplit.core.manifest import MANIFEST, Manifest, check_bundle_contents, compute_model_id, load_bundle, \
    parse_manifest, sha256_file, write_manifest
from fogsplit.core.signing import SIGNATURE, KeyFileError, PrivateKey, SignatureError, key_id, load_private_key, \
    load_public_key, new_key_pair, sign_bundle, sign_ephemeral, verify_bundle
from fogsplit.core.validation import load as load_model

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def keys(tmp_path):
    return new_key_pair(tmp_path / "keys", "ops")


@pytest.fixture
def small_bundle(tmp_path):
    """Enough of a bundle for the signature: a manifest.json (not parsed by verify_bundle)."""
    path = tmp_path / "b"
    path.mkdir()
    (path / MANIFEST).write_text('{"thresholds": {"local": 0.3, "edge": 0.2}}\n')
    return path


@pytest.fixture
def copy(bundle_dir, tmp_path):
    return shutil.copytree(bundle_dir, tmp_path / "copy")


def refused(reason: str, call, *args, **kwargs) -> SignatureError:
    with pytest.raises(SignatureError) as err:
        call(*args, **kwargs)
    assert err.value.reason == reason and str(err.value).startswith(f"{reason}: "), str(err.value)
    return err.value


# -- keys and the round trip ---------------------------------------------------------------------

def test_a_key_pair_signs_and_verifies(keys, small_bundle):
    private, public = keys
    assert (private.name, public.name) == ("ops.key", "ops.pub")
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert public.read_text().startswith("fogsplit-ed25519-public ") and public.read_text().endswith(" ops\n")
    key = load_public_key(public)
    assert len(key.raw) == 32 and key.name == "ops"
    assert key_id(key) == key.id == hashlib.sha256(key.raw).hexdigest()[:16]

    sig_path = sign_bundle(small_bundle, private)
    body = json.loads(sig_path.read_text())
    assert sig_path == small_bundle / SIGNATURE and body["algorithm"] == "ed25519" and body["key_id"] == key.id
    assert len(base64.b64decode(body["signature"])) == 64
    assert verify_bundle(small_bundle, [public]) == key.id
    assert verify_bundle(small_bundle, [load_public_key(new_key_pair(small_bundle.parent, "other")[1]), key]) == key.id


def test_a_key_pair_is_never_overwritten_and_its_name_is_checked(keys, tmp_path):
    with pytest.raises(KeyFileError, match="exists: refusing to overwrite"):
        new_key_pair(keys[0].parent, "ops")
    for bad in ("", "a/b", "two words", ".."):
        with pytest.raises(KeyFileError, match="key name"):
            new_key_pair(tmp_path, bad)


def test_the_private_key_never_prints(keys, caplog):
    key = load_private_key(keys[0])
    seed = keys[0].read_text().split()[1]
    assert seed not in repr(key) and seed not in str(key) and key.public_key.id in repr(key)
    assert seed not in caplog.text


def test_a_private_key_others_can_read_is_used_with_a_warning(keys, caplog):
    os.chmod(keys[0], 0o644)
    with caplog.at_level(logging.WARNING):
        load_private_key(keys[0])
    assert "readable by other users" in caplog.text


# -- what is refused ----------------------------------------------------------------------------

def test_an_edited_manifest_is_tampered(keys, small_bundle):
    sign_bundle(small_bundle, keys[0])
    raw = (small_bundle / MANIFEST).read_bytes()
    (small_bundle / MANIFEST).write_bytes(raw.replace(b"0.3", b"0.9"))
    error = refused("tampered", verify_bundle, small_bundle, [keys[1]])
    assert str(small_bundle) in str(error) and "\n" not in str(error)


def test_a_bundle_signed_by_an_unknown_key_is_refused(keys, small_bundle, tmp_path):
    stranger = new_key_pair(tmp_path / "stranger", "stranger")
    sign_bundle(small_bundle, stranger[0])
    error = refused("unknown key", verify_bundle, small_bundle, [keys[1]])
    assert load_public_key(stranger[1]).id in str(error) and load_public_key(keys[1]).id in str(error)
    assert "trusted: none" in str(refused("unknown key", verify_bundle, small_bundle, []))


def test_an_unsigned_bundle_is_refused(keys, small_bundle):
    assert "fogsplit sign" in str(refused("unsigned", verify_bundle, small_bundle, [keys[1]]))


@pytest.mark.parametrize("text, needle", [
    ("{not json", "not valid JSON"),
    ("[]", "expected the keys"),
    ('{"algorithm": "ed25519", "key_id": "00"}', "expected the keys"),
    ('{"algorithm": "rsa", "key_id": "0011223344556677", "signature": ""}', "algorithm 'rsa'"),
    ('{"algorithm": "ed25519", "key_id": "zz11223344556677", "signature": ""}', "16 hex digits"),
    ('{"algorithm": "ed25519", "key_id": "0011223344556677", "signature": "AAAA"}', "64 bytes"),
    ('{"algorithm": "ed25519", "key_id": "0011223344556677", "signature": "!!"}', "64 bytes"),
    ('{"algorithm": "ed25519", "key_id": "0011223344556677", "signature": 7}', "64 bytes"),
    ("x" * 5000, "larger than"),
])
def test_a_malformed_signature_file_is_refused(keys, small_bundle, text, needle):
    (small_bundle / SIGNATURE).write_text(text)
    error = refused("malformed", verify_bundle, small_bundle, [keys[1]])
    assert needle in str(error) and SIGNATURE in str(error)


@pytest.mark.parametrize("content, needle", [
    (None, "cannot read the key file"),
    (b"", "not a fogsplit key file"),
    (b"ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAA user@host\n", "not a fogsplit key file"),
    (b"fogsplit-ed25519-public !!!! x\n", "not valid base64"),
    (b"fogsplit-ed25519-public " + base64.b64encode(b"short") + b" x\n", "32 bytes, this one is 5"),
    (b"\xff\xfe binary", "not ASCII"),
    (b"fogsplit-ed25519-public " + b"A" * 2000, "larger than 1 KiB"),
])
def test_a_malformed_public_key_file_is_refused(tmp_path, content, needle):
    path = tmp_path / "bad.pub"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(KeyFileError) as err:
        load_public_key(path)
    assert needle in str(err.value) and str(path) in str(err.value)


def test_a_key_of_the_wrong_kind_is_refused(keys, small_bundle):
    with pytest.raises(KeyFileError, match="is a private key; trust its .pub"):
        verify_bundle(small_bundle, [keys[0]])
    with pytest.raises(KeyFileError, match="is a public key; sign with the .key"):
        sign_bundle(small_bundle, keys[1])
    assert not (small_bundle / SIGNATURE).exists()


# -- load_bundle: the signature first, on the bytes it then parses --------------------------------

def test_load_bundle_verifies_before_it_loads(copy, trusted_keys, signing_key):
    bundle = load_bundle(copy, trusted_keys=trusted_keys)
    assert bundle.signed_by == load_public_key(signing_key[1]).id
    assert load_bundle(copy, trusted_keys=[load_public_key(p) for p in trusted_keys]).signed_by == bundle.signed_by


def test_a_one_byte_edit_of_the_thresholds_is_refused(copy, trusted_keys):
    raw = (copy / MANIFEST).read_bytes()
    start = raw.index(b'"local": ', raw.index(b'"thresholds"')) + len(b'"local": ')
    end = start + next(i for i, c in enumerate(raw[start:]) if chr(c) not in "0123456789.")
    number = raw[start:end]                                  # e.g. 0.35 -> 0.36, 1.0 -> 0.0
    new = b"0" + number[1:] if number.startswith(b"1") else number[:-1] + str((int(chr(number[-1])) + 1) % 10).encode()
    edited = raw[:start] + new + raw[end:]
    assert len(edited) == len(raw) and sum(a != b for a, b in zip(raw, edited)) == 1
    (copy / MANIFEST).write_bytes(edited)
    parse_manifest(json.loads(edited))     # still a valid manifest: only the signature tells
    refused("tampered", load_bundle, copy, trusted_keys=trusted_keys)
    refused("tampered", load_bundle, copy, trusted_keys=trusted_keys, allow_unsigned=True)


def test_changed_weights_rehashed_in_the_manifest_but_not_resigned_are_refused(copy, trusted_keys):
    with open(copy / "gateway.onnx", "ab") as f:
        f.write(b"\x00")
    data = json.loads((copy / MANIFEST).read_text())
    for shard in data["shards"]:
        if shard["file"] == "gateway.onnx":
            shard["sha256"] = sha256_file(copy / "gateway.onnx")
    data["model_id"] = compute_model_id(load_model(data, Manifest, "draft", BundleError))
    (copy / MANIFEST).write_text(json.dumps(data, indent=2))
    check_bundle_contents(copy)            # every hash and the model id agree: only the signature tells
    refused("tampered", load_bundle, copy, trusted_keys=trusted_keys)


def test_unknown_key_and_unsigned_through_load_bundle(copy, trusted_keys, tmp_path):
    other = new_key_pair(tmp_path / "k", "other")
    sign_bundle(copy, other[0])
    refused("unknown key", load_bundle, copy, trusted_keys=trusted_keys)
    refused("unknown key", load_bundle, copy, trusted_keys=trusted_keys, allow_unsigned=True)
    assert load_bundle(copy, trusted_keys=[other[1]]).signed_by == load_public_key(other[1]).id
    (copy / SIGNATURE).unlink()
    refused("unsigned", load_bundle, copy, trusted_keys=trusted_keys)
    assert load_bundle(copy, allow_unsigned=True).signed_by is None


def test_a_rewritten_manifest_drops_the_signature_it_no_longer_matches(copy, trusted_keys):
    manifest = load_bundle(copy, trusted_keys=trusted_keys).manifest
    write_manifest(manifest, copy)
    assert not (copy / SIGNATURE).exists()
    refused("unsigned", load_bundle, copy, trusted_keys=trusted_keys)


def test_an_ephemeral_key_signs_what_this_process_wrote(copy):
    key = sign_ephemeral(copy)
    assert load_bundle(copy, trusted_keys=[key]).signed_by == key.id
    refused("unknown key", load_bundle, copy, trusted_keys=[PrivateKey.generate().public_key])


# -- the command line -----------------------------------------------------------------------------

def test_keys_new_and_sign_on_the_command_line(copy, tmp_path, capsys):
    out = tmp_path / "k"
    assert main(["keys", "new", "--out", str(out), "--name", "fleet"]) == 0
    assert (out / "fleet.key").exists() and (out / "fleet.pub").exists()
    key = load_public_key(out / "fleet.pub")
    assert key.id in capsys.readouterr().out
    assert main(["keys", "new", "--out", str(out), "--name", "fleet"]) == 2
    assert "exists" in capsys.readouterr().err

    assert main(["sign", "--bundle", str(copy), "--key", str(out / "fleet.key")]) == 0
    assert key.id in capsys.readouterr().out
    assert load_bundle(copy, trusted_keys=[out / "fleet.pub"]).signed_by == key.id


@pytest.mark.parametrize("argv", [["keys", "new", "--out", "x", "--name", "a/b"], ["keys", "new"],
                                  ["keys", "rotate", "--out", "x"], ["sign", "--bundle", "b"],
                                  ["gateway", "--bundle", "b", "--trusted-key", ""]])
def test_bad_key_and_sign_flags_are_refused(argv, capsys):
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(argv)
    assert exit_.value.code == 2


def test_sign_refuses_a_bad_key_or_a_bundle_whose_shards_do_not_match(copy, tmp_path, signing_key, capsys):
    assert main(["sign", "--bundle", str(copy), "--key", str(signing_key[1])]) == 2
    assert "is a public key" in capsys.readouterr().err
    assert main(["sign", "--bundle", str(tmp_path / "none"), "--key", str(signing_key[0])]) == 2
    assert "no manifest.json" in capsys.readouterr().err
    before = (copy / SIGNATURE).read_bytes()
    with open(copy / "cloud.onnx", "ab") as f:
        f.write(b"\x00")
    assert main(["sign", "--bundle", str(copy), "--key", str(signing_key[0])]) == 2
    assert "sha256" in capsys.readouterr().err
    assert (copy / SIGNATURE).read_bytes() == before, "nothing signed"


def _unreachable() -> str:
    from fogsplit.bench.embedded import free_port
    return f"mqtt://127.0.0.1:{free_port()}"


@pytest.fixture
def clean_env(monkeypatch):
    for name in [n for n in os.environ if n.startswith("FOGSPLIT_")]:
        monkeypatch.delenv(name)
    return monkeypatch


@pytest.mark.parametrize("role, extra", [("gateway", []), ("cloud", []), ("device", ["--device", "cam0"])])
def test_a_tier_on_a_tampered_bundle_exits_2_naming_bundle_and_reason(role, extra, copy, trusted_keys, capsys,
                                                                       clean_env, small_data, tmp_path):
    if role == "device":
        from fogsplit.core.dataset import save_npz
        extra = extra + ["--data", str(save_npz(small_data.subset(list(range(10))), tmp_path / "replay.npz"))]
    data = json.loads((copy / MANIFEST).read_text())
    data["thresholds"]["local"] = 0.99
    (copy / MANIFEST).write_text(json.dumps(data, indent=2))
    code = main([role, "--bundle", str(copy), "--trusted-key", str(trusted_keys[0]), "--broker", _unreachable(),
                 *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith(f"fogsplit {role}: error: tampered: bundle {copy}: ")


def test_a_tier_refuses_unsigned_and_unknown_key_and_a_bad_key_file(copy, trusted_keys, tmp_path, capsys, clean_env):
    assert main(["gateway", "--bundle", str(copy), "--broker", _unreachable()]) == 2
    assert "error: unknown key: " in capsys.readouterr().err      # nothing trusted: a signature proves nothing
    bad = tmp_path / "bad.pub"
    bad.write_text("hello\n")
    assert main(["gateway", "--bundle", str(copy), "--trusted-key", str(bad), "--broker", _unreachable()]) == 2
    assert f"{bad}: not a fogsplit key file" in capsys.readouterr().err
    (copy / SIGNATURE).unlink()
    assert main(["cloud", "--bundle", str(copy), "--trusted-key", str(trusted_keys[0]), "--broker",
                 _unreachable()]) == 2
    assert "error: unsigned: " in capsys.readouterr().err


def test_allow_unsigned_starts_with_one_warning(copy, trusted_keys, capsys, caplog, clean_env):
    (copy / SIGNATURE).unlink()
    with caplog.at_level(logging.INFO):
        code = main(["gateway", "--bundle", str(copy), "--allow-unsigned", "--broker", _unreachable()])
    assert code == 2 and "cannot reach broker" in capsys.readouterr().err   # the bundle was accepted
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "allow_unsigned" in r.getMessage()]
    assert len(warnings) == 1 and "is unsigned and accepted" in warnings[0].getMessage()


def test_trusted_keys_from_the_file_and_the_environment(copy, trusted_keys, tmp_path, capsys, clean_env):
    settings = tmp_path / "gw.toml"
    settings.write_text(f'bundle = "{copy}"\ntrusted_keys = ["{trusted_keys[0]}"]\n')
    assert main(["gateway", "--config", str(settings), "--broker", _unreachable()]) == 2
    assert "cannot reach broker" in capsys.readouterr().err
    clean_env.setenv("FOGSPLIT_TRUSTED_KEYS", f"{tmp_path / 'missing.pub'},{trusted_keys[0]}")
    assert main(["gateway", "--bundle", str(copy), "--broker", _unreachable()]) == 2
    assert "missing.pub: cannot read the key file" in capsys.readouterr().err


def test_the_exit_code_and_the_last_line_of_a_real_process(copy, trusted_keys, tmp_path):
    (copy / SIGNATURE).write_text("{}")
    env = {k: v for k, v in os.environ.items() if not k.startswith("FOGSPLIT_")}
    proc = subprocess.run([sys.executable, "-m", "fogsplit.cli", "gateway", "--bundle", str(copy), "--trusted-key",
                           str(trusted_keys[0]), "--broker", _unreachable()], capture_output=True, text=True,
                          timeout=60, env=env)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith(f"fogsplit gateway: error: malformed: bundle {copy}: ")


def test_export_signs_what_it_writes_and_checks_the_key_first(copy, tmp_path, small_data, signing_key, monkeypatch,
                                                              capsys, clean_env):
    from types import SimpleNamespace
    import fogsplit.export.pipeline as pipeline
    from fogsplit.core.dataset import save_npz
    data = save_npz(small_data.subset(list(range(10))), tmp_path / "d.npz")
    written = []

    def fake_export(dataset, out, options):      # what export_bundle leaves: an unsigned bundle
        shutil.copytree(copy, out)
        (out / SIGNATURE).unlink()
        written.append(out)
        return SimpleNamespace(manifest=check_bundle_contents(out), path=out)

    monkeypatch.setattr(pipeline, "export_bundle", fake_export)
    out = tmp_path / "exported"
    assert main(["export", "--data", str(data), "--out", str(out), "--sign-key", str(signing_key[1])]) == 2
    assert "is a public key" in capsys.readouterr().err and not written, "refused before training"
    assert main(["export", "--data", str(data), "--out", str(out), "--sign-key", str(signing_key[0])]) == 0
    assert load_bundle(out, trusted_keys=[signing_key[1]]).signed_by == load_public_key(signing_key[1]).id
    assert "signed by key" in capsys.readouterr().out


# -- the shipped deployment trusts a mounted key ----------------------------------------------------

def test_the_compose_deployment_trusts_a_mounted_public_key():
    compose = yaml.safe_load((REPO / "compose" / "docker-compose.yml").read_text())
    for role in ("gateway", "cloud"):
        config = load_config(role, path=REPO / "compose" / "config" / f"{role}.toml", environ={},
                             read_secrets=False).config
        assert config.trusted_keys and not config.allow_unsigned, role
        mounts = [(v.split(":") + ["rw"])[:3] for v in compose["services"][role]["volumes"]]
        for key in config.trusted_keys:
            host = [(src, dst) for src, dst, mode in mounts if mode == "ro" and key.startswith(dst + "/")]
            assert host, f"{role}: {key} is in no read-only mount"
            assert (REPO / "compose" / host[0][0]).is_dir()
    exporter = compose["services"]["exporter"]
    sign_key = exporter["command"][exporter["command"].index("--sign-key") + 1]
    assert sign_key == f"/run/secrets/{exporter['secrets'][0]}"
    assert compose["secrets"][exporter["secrets"][0]]["file"].startswith("./secrets/")
    device = load_config("device", path=REPO / "compose" / "config" / "device.toml", environ={},
                         read_secrets=False).config
    assert device.trusted_keys and not device.allow_unsigned
    unit = (REPO / "compose" / "fogsplit-device.service").read_text()
    assert all(key in unit for key in device.trusted_keys), "the unit's file list names the trusted key"


def test_a_config_error_is_not_a_bundle_error():
    assert issubclass(KeyFileError, ConfigError) and issubclass(SignatureError, BundleError)
