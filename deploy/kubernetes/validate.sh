#!/usr/bin/env bash
# Validates the manifests offline against the Kubernetes OpenAPI schemas (kubernetes-validate
# bundles them: no cluster, no network once installed), strictly: an unknown or misspelt field
# fails. Usage: deploy/kubernetes/validate.sh [KUBERNETES_VERSION]
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VERSION="${1:-1.31.0}"
VENV="${K8S_VALIDATE_VENV:-${TMPDIR:-/tmp}/carerecord-k8s-validate}"
if [[ ! -x "$VENV/bin/kubernetes-validate" ]]; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q --disable-pip-version-check "kubernetes-validate==1.37.0"
fi
# kustomization.yaml is kustomize's, not a Kubernetes API object.
manifests=()
for f in "$HERE"/*.yaml; do
  [[ "$(basename "$f")" == kustomization.yaml ]] || manifests+=("$f")
done
"$VENV/bin/kubernetes-validate" --strict --kubernetes-version "$VERSION" "${manifests[@]}"
