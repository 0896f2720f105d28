#!/usr/bin/env bash
# What `make setup` needs before it creates .venv: prints one line (the first thing missing and how to install it)
# and exits 1, or prints nothing and exits 0. Usage: tools/prereqs.sh [python]   (default python3.11)
# The Makefile turns that line into its own one-line stop; run it directly to check a machine.
py=${1:-python3.11}

missing() {
  echo "$1 not found: $2"
  exit 1
}

command -v "$py" >/dev/null 2>&1 \
  || missing "$py (Python 3.11)" "install it (Debian/Ubuntu: sudo apt-get install python3.11 python3.11-venv; or pyenv install 3.11) or pass PY=/path/to/python3.11"
"$py" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' 2>/dev/null \
  || missing "Python 3.11 ($py runs but is not 3.11)" "install Python 3.11 or pass PY=/path/to/python3.11"
"$py" -c 'import venv, ensurepip' 2>/dev/null \
  || missing "the venv module of $py" "install it (Debian/Ubuntu: sudo apt-get install python3.11-venv)"
command -v make >/dev/null 2>&1 || missing "make" "install it (Debian/Ubuntu: sudo apt-get install make; macOS: xcode-select --install)"
command -v git >/dev/null 2>&1 || missing "git" "install it (Debian/Ubuntu: sudo apt-get install git; macOS: xcode-select --install)"
command -v node >/dev/null 2>&1 \
  || missing "Node.js (>= 18, for the Azurite blob emulator)" "install it from https://nodejs.org or with nvm (nvm install 20)"
node -e 'process.exit(Number(process.versions.node.split(".")[0]) >= 18 ? 0 : 1)' 2>/dev/null \
  || missing "Node.js >= 18 (found $(node --version 2>/dev/null))" "install a newer one from https://nodejs.org or with nvm (nvm install 20)"
command -v npm >/dev/null 2>&1 || missing "npm (ships with Node.js)" "install it with Node.js from https://nodejs.org (Debian/Ubuntu: sudo apt-get install npm)"
command -v g++ >/dev/null 2>&1 \
  || missing "g++ (builds olive_lab/kernels, optimize.lora_layout=fused's custom op)" "install it (Debian/Ubuntu: sudo apt-get install g++; macOS: xcode-select --install)"
command -v tmux >/dev/null 2>&1 \
  || missing "tmux (the terminal chat's end-to-end tests)" "install it (Debian/Ubuntu: sudo apt-get install tmux; macOS: brew install tmux)"
exit 0
