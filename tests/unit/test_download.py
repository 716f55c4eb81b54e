from pathlib import Path

from perennial_trainer.download import MARKER, download, main


def test_download_copies_a_directory_and_is_idempotent(tmp_path: Path, monkeypatch):
    src = tmp_path / "pvc" / "models" / "tiny"
    src.mkdir(parents=True)
    (src / "config.json").write_text("{}")
    (src / "weights.bin").write_bytes(b"\0" * 10)
    monkeypatch.setenv("PERENNIAL_PVC_ROOT", str(tmp_path / "pvc"))
    dest = download("pvc://models/tiny", str(tmp_path / "cache" / "model"))
    assert (dest / "config.json").read_text() == "{}" and (dest / MARKER).exists()
    (src / "config.json").write_text('{"changed": true}')
    download("pvc://models/tiny", str(dest))  # marker: no second copy
    assert (dest / "config.json").read_text() == "{}"


def test_download_failure_is_reported(tmp_path: Path, monkeypatch):
    log = tmp_path / "termination-log"
    monkeypatch.setenv("PERENNIAL_TERMINATION_LOG", str(log))
    assert main(["--source", f"file://{tmp_path}/missing", "--dest", str(tmp_path / "d")]) == 1
    assert "DownloadFailed" in log.read_text()
