#!/usr/bin/env bash
# The mutation target (docs/testing.md): mutmut over the modules named in pyproject's [tool.mutmut],
# then the score (killed / all mutants that ran) and the survivors.
#
#   scripts/mutation.sh                          the whole target as configured (hours on 2 cores)
#   scripts/mutation.sh MODULE TESTS...          one module (or package folder) against the tests given, e.g.
#   scripts/mutation.sh loraplex/kv/block_pool.py tests/kv/test_block_pool.py
#   MUTATION_SAMPLE=300 scripts/mutation.sh loraplex/server tests/server tests/e2e
#                                                a random sample of the mutants (MUTATION_SEED, default 0):
#                                                for modules whose tests are slow (the e2e tests)
#
# With a module, mutmut runs in a scratch copy of the work tree whose [tool.mutmut] names only that
# module and those tests (mutmut first runs its whole test selection once to learn which test covers
# what, so a module's run should not pay for the e2e suite). Results stay in that copy's mutants/
# (the path is printed); `cd` there and `mutmut show NAME` prints a survivor's diff.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

if [[ $# -gt 0 ]]; then
    module=$1
    shift
    [[ $# -gt 0 ]] || { echo "usage: $0 [MODULE TESTS...]" >&2; exit 2; }
    [[ -e $module ]] || { echo "no module $module" >&2; exit 2; }
    [[ -d $module ]] && module="${module%/}/*"  # a package: every module in it
    work=$(mktemp -d "${TMPDIR:-/tmp}/loraplex-mutation.XXXXXX")
    tar -C "$root" --exclude=./.venv --exclude=./mutants --exclude=.git --exclude=__pycache__ -cf - . | tar -C "$work" -xf -
    python - "$work/pyproject.toml" "$module" "$@" <<'EOF'
import json, re, sys
path, module, tests = sys.argv[1], sys.argv[2], sys.argv[3:]
text = open(path).read()
text = re.sub(r"only_mutate = \[.*?\]", f"only_mutate = {json.dumps([module])}", text, count=1, flags=re.S)
text = re.sub(r"pytest_add_cli_args_test_selection = \[.*?\]",
              f"pytest_add_cli_args_test_selection = {json.dumps(tests)}", text, count=1, flags=re.S)
open(path, "w").write(text)
EOF
    cd "$work"
    echo "mutation run of $module against $* in $work"
fi

# mutmut forks a process per mutant from one that has already run torch ops; an OpenMP thread pool does not
# survive a fork, and a mutant's tests would then hang until mutmut's timeout, which counts as killed. One
# thread: no pool, no hang, and a timeout means the mutant's own code looped.
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
rm -rf mutants
if [[ -n ${MUTATION_SAMPLE:-} ]]; then
    # First the mutants and the test coverage map, with no mutant run: a name that matches no mutant stops
    # mutmut after both are written. Then a seeded random sample of the mutants' names, run by name.
    mutmut run --max-children "${MUTATION_JOBS:-2}" "no-mutant-has-this-name" >mutants-setup.log 2>&1 || true
    [[ -s mutants/mutmut-stats.json ]] || { cat mutants-setup.log >&2; echo "mutmut setup failed" >&2; exit 1; }
    mapfile -t sample < <(python - "$MUTATION_SAMPLE" "${MUTATION_SEED:-0}" <<'EOF'
import json, pathlib, random, sys
names = sorted(name for meta in pathlib.Path("mutants").rglob("*.meta")
               for name in json.loads(meta.read_text())["exit_code_by_key"])
random.Random(int(sys.argv[2])).shuffle(names)
print(f"sampled {min(len(names), int(sys.argv[1]))} of {len(names)} mutants", file=sys.stderr)
print("\n".join(sorted(names[:int(sys.argv[1])])))
EOF
    )
    mutmut run --max-children "${MUTATION_JOBS:-2}" "${sample[@]}" || true
else
    mutmut run --max-children "${MUTATION_JOBS:-2}" || true  # a non-zero exit only says that mutants survived
fi
mutmut results --all true >mutants/results.txt 2>&1 || mutmut results >mutants/results.txt 2>&1 || true
python - mutants/results.txt <<'EOF'
import collections, re, sys
counts = collections.Counter()
survivors = []
for line in open(sys.argv[1]):
    m = re.match(r"\s*(\S+): (.+)$", line)
    if not m:
        continue
    name, status = m.group(1), m.group(2).strip()
    counts[status] += 1
    if status not in ("killed", "timeout", "skipped", "not checked"):
        survivors.append(f"{status}: {name}")
# A mutant that no selected test runs ("no tests") is a missing test as much as a survivor: it counts.
total = sum(n for s, n in counts.items() if s not in ("skipped", "not checked"))
killed = counts["killed"] + counts["timeout"]
score = 100 * killed / total if total else 0.0
print(f"mutation score: {killed}/{total} killed ({score:.0f} %); by status: {dict(counts)}")
for line in sorted(survivors):
    print(f"  {line}")
EOF
echo "results: $PWD/mutants/results.txt (mutmut show NAME in $PWD prints a mutant's diff)"
