"""``vdiff weights list|download|verify``: the pretrained files vdiff knows, fetched ahead of a job, checked.

``list``       every preset of :mod:`vdiff.weights.registry`: its source, size, licence, purpose, where it goes and
               whether it is there now.
``download``   preset names, ``hf://`` ids or downloadable file names: fetched now (for a node that prepares the
               caches before a job that runs without network: the same ``HF_HOME`` and ``VDIFF_CACHE`` there).
``verify``     re-hash what is cached: URL files against their pin and the digest recorded at download, hub files
               against the hub's digests (their blob names); exit status 1 when one does not match.
"""

from __future__ import annotations

import argparse
import sys

from vdiff.weights import hub
from vdiff.weights.download import digest_matches, recorded_digest
from vdiff.weights.registry import PRESETS, WeightsPreset, fetch, get_preset, local_file, weights_cache_dir
from vdiff.weights.safetensors_io import file_sha256


def add_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", required=True, metavar="{list,download,verify}")
    actions.add_parser("list", help="every preset: source, size, licence, purpose, where it goes, whether it is cached")
    download = actions.add_parser("download", help="fetch presets or hub ids now (e.g. before a job without network)")
    download.add_argument("names", nargs="+", metavar="NAME", help="a preset (vdiff weights list) or hf://ORG/NAME[/PATH]")
    verify = actions.add_parser("verify", help="re-hash cached files against their pins and the hub's digests")
    verify.add_argument("names", nargs="*", metavar="NAME", help="presets or hf:// ids (default: every cached preset)")


def _where(preset: WeightsPreset) -> str:
    if preset.is_hub:
        return str(hub.repo_cache_folder(hub.parse_hub_id(preset.source).repo_id))
    return str(local_file(preset) or weights_cache_dir() / preset.file)


def _cached(preset: WeightsPreset) -> bool:
    return (hub.cached_hub_path(preset.source) if preset.is_hub else local_file(preset)) is not None


def list_presets() -> int:
    print(f"Hub presets go to the Hugging Face cache ({hub.hub_cache_dir()}), the others to {weights_cache_dir()}.")
    for preset in PRESETS.values():
        state = "cached" if _cached(preset) else "not cached"
        print(f"\n{preset.name}  ({state}, {preset.size})")
        print(f"    {preset.source}")
        print(f"    {preset.purpose}")
        print(f"    licence: {preset.licence}")
        print(f"    goes to: {_where(preset)}")
        print(f"    checked: {preset.pin}" + (f" ({preset.note})" if preset.note else ""))
    return 0


def download(names: list[str]) -> int:
    targets = [hub.parse_hub_id(name) if hub.is_hub_id(name) else get_preset(name) for name in names]  # names checked
    failed = []
    for name, target in zip(names, targets, strict=True):
        try:
            path = hub.resolve_hub_path(target) if isinstance(target, hub.HubId) else fetch(target)
        except (OSError, ValueError) as err:
            failed.append(f"{name}: {err}")
            print(f"{name}: FAILED", file=sys.stderr)
            continue
        print(f"{name}: {path}")
    if failed:
        raise OSError(f"{len(failed)} of {len(names)} could not be fetched: " + "; ".join(failed))
    return 0


def _verify_url(preset: WeightsPreset) -> list[tuple[str, bool | None, str]]:
    file = local_file(preset)
    if file is None:
        return []
    digest = file_sha256(file)
    recorded = recorded_digest(file)
    ok = digest_matches(digest, preset.sha256) and recorded in (None, digest)
    if preset.sha256 is None and recorded is None:
        return [(str(file), None, f"sha256 {digest}; no pin and no digest recorded at download to compare with")]
    against = [f"pinned {preset.sha256}"] if preset.sha256 else []
    against += [f"recorded at download {recorded}"] if recorded else []
    return [(str(file), ok, f"sha256 {digest}" + ("" if ok else f", expected {' and '.join(against)}"))]


def verify(names: list[str]) -> int:
    targets: list[str] = names or [p.name for p in PRESETS.values() if _cached(p)]
    rows: list[tuple[str, bool | None, str]] = []
    for name in targets:
        found = hub.verify_cached(name) if hub.is_hub_id(name) else None
        if found is None:
            preset = get_preset(name)
            found = hub.verify_cached(preset.source) if preset.is_hub else _verify_url(preset)
        if not found:
            raise FileNotFoundError(f"{name}: nothing cached to verify (`vdiff weights download {name}` fetches it)")
        rows += found
    for path, ok, detail in rows:
        print(f"{'OK' if ok else 'MISMATCH' if ok is False else 'UNCHECKED':<9} {path}  {detail}")
    bad = sum(ok is False for _, ok, _ in rows)
    print(f"{len(rows)} files: {len(rows) - bad} match, {bad} do not" if rows else "nothing cached")
    return 1 if bad else 0


def run(args: argparse.Namespace) -> int:
    if args.action == "list":
        return list_presets()
    if args.action == "download":
        return download(args.names)
    return verify(args.names)
