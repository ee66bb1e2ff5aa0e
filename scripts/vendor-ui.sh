#!/usr/bin/env bash
# Refreshes the dashboard's vendored copy of uPlot (ui/vendor/) from the npm registry.
#
# The dashboard (ui/, served by src/api/dashboard.rs, embedded in the binary) loads nothing from
# the network: its one third-party file set is uPlot, copied here from the published npm package
# at a pinned version. To move to another version, change UPLOT_VERSION (or pass it as the first
# argument), run this script, look at the diff and at the dashboard in a browser, and record the
# version and the printed sha256 sums in ui/README.md.
#
#   scripts/vendor-ui.sh            # the pinned version
#   scripts/vendor-ui.sh 1.6.32     # another one
#
# Needs npm and tar. Copies dist/uPlot.iife.min.js, dist/uPlot.min.css and LICENSE (MIT).
set -euo pipefail

UPLOT_VERSION="${1:-1.6.32}"

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dest="$root/ui/vendor"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

# `npm pack` downloads the package tarball exactly as published (and checks its integrity against
# the registry's) without installing anything or running any package script.
(cd "$work" && npm pack --silent "uplot@${UPLOT_VERSION}" >/dev/null)
tarball="$(ls "$work"/uplot-*.tgz)"
tar -xzf "$tarball" -C "$work"

pkg="$work/package"
got="$(node -p "require('$pkg/package.json').version" 2>/dev/null || echo "$UPLOT_VERSION")"
if [ "$got" != "$UPLOT_VERSION" ]; then
  echo "vendor-ui: asked for uplot@$UPLOT_VERSION, the tarball is $got" >&2
  exit 1
fi

mkdir -p "$dest"
cp "$pkg/dist/uPlot.iife.min.js" "$dest/uPlot.iife.min.js"
cp "$pkg/dist/uPlot.min.css" "$dest/uPlot.min.css"
cp "$pkg/LICENSE" "$dest/uPlot.LICENSE"

echo "uplot@$UPLOT_VERSION -> ${dest#"$root"/}"
echo "tarball sha256: $(sha256sum "$tarball" | cut -d' ' -f1)  $(basename "$tarball")"
(cd "$dest" && sha256sum uPlot.iife.min.js uPlot.min.css uPlot.LICENSE)
