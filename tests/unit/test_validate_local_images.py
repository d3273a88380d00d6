"""`validate` finds local images that are not there (an `oci:` layout or tag, a `docker-archive:` file or name)
with the container's path in the group, every problem at once, exit 2; registry images are not contacted."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from clirun import run_cli

from tests.imagefixtures import docker_archive, oci_image


def _group(tmp_path: Path, *images: str) -> Path:
    doc = {"name": "g", "containers": [{"name": f"c{i}", "image": image, "command": ["/bin/true"]}
                                       for i, image in enumerate(images)]}
    path = tmp_path / "group.json"
    path.write_text(json.dumps(doc))
    return path


@pytest.fixture
def images(tmp_path: Path) -> Path:
    oci_image(tmp_path / "images" / "app", tag="v1")
    docker_archive(tmp_path / "app.tar", tags=("test/app:1", "test/tool:2"))
    return tmp_path


def test_existing_local_images_and_registry_references_validate(images: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    group = _group(images, "oci:images/app:v1", "docker-archive:app.tar:test/tool:2",
                   "registry.invalid/never/contacted:1")
    code, out, err = run_cli(["validate", str(group)], capsys)
    assert code == 0, err
    assert "valid: group 'g' with 3 container(s)" in out


@pytest.mark.parametrize(("image", "expected"), [
    ("oci:images/nope:v1", "is not a directory (build or copy the OCI image layout there first)"),
    ("oci:images:v1", "is not an OCI image layout (no oci-layout file)"),
    ("oci:images/app:v2", "no image tagged 'v2' in"),
    ("docker-archive:missing.tar", "missing.tar does not exist"),
    ("docker-archive:app.tar:test/other:9", "no image tagged 'test/other:9'"),
    ("docker-archive:group.json", "is not a tar archive"),
])
def test_a_missing_local_image_is_an_input_error(images: Path, image: str, expected: str,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli(["validate", str(_group(images, "busybox", image))], capsys)
    assert code == 2
    assert f"containers[1].image: {image}: " in err and expected in err, err
    assert "Traceback" not in err and "local image paths are relative to the group file" in err


def test_a_missing_manifest_blob_is_found(images: Path, capsys: pytest.CaptureFixture[str]) -> None:
    index = json.loads((images / "images" / "app" / "index.json").read_text())
    digest = index["manifests"][0]["digest"].split(":")[1]
    (images / "images" / "app" / "blobs" / "sha256" / digest).unlink()
    code, _, err = run_cli(["validate", str(_group(images, "oci:images/app:v1"))], capsys)
    assert code == 2 and f"blob sha256:{digest} is missing" in err


def test_every_missing_image_is_listed_at_once(images: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli(["validate", str(_group(images, "oci:a", "oci:images/app:v1", "docker-archive:b.tar"))],
                           capsys)
    assert code == 2 and "(2 problems)" in err
    assert "containers[0].image: oci:a:" in err and "containers[2].image: docker-archive:b.tar:" in err
