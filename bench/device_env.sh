# Sourced by the bench suites on the device machine (`source bench/device_env.sh` from the repository root).
# install_wheels [FOLDER...]: installs the carried wheels of .whl/ and of each FOLDER that holds any (the GPU image
# lacks diffusers, torchao, PyAV, ...) into .site/ (git-ignored; a warm machine keeps it for its next call), then
# points PYTHONPATH at them, the package (src) and the repository (bench/'s helpers, tests).
install_wheels() {
  local wheels=() folder
  for folder in .whl "$@"; do
    if compgen -G "$folder/*.whl" >/dev/null; then wheels+=("$folder"/*.whl); fi
  done
  if ((${#wheels[@]})); then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target .site "${wheels[@]}"
  fi
  export PYTHONPATH=$PWD/.site:src:. PYTHONUNBUFFERED=1
}
