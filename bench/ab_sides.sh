# Side a (a git revision) and side b (the working tree) of the same sources, each compiled in its
# own namespace (-Dpm=pm_ab_a, -Dpm=pm_ab_b) so that one program holds both and alternates them:
# the only way to see a few percent on a host that drifts by 10-30% (bench/gemm_ab.sh,
# bench/attention_ab.sh source this file).
#
#   ab_flags=(-O3 -march=native ...); ab_sides REV WORK RUNNER MACRO FILES...
# compiles FILES (paths under src/; one missing at REV is skipped) and RUNNER (a bench file, with
# -DMACRO=run_a or run_b) once per side into WORK, and lists the objects in the array ab_objects.
# B_FLAGS (environment): extra compiler flags for side b's FILES only.
ab_sides() {
  local rev=$1 work=$2 runner=$3 macro=$4
  shift 4
  mkdir -p "$work/a"
  git archive "$rev" src | tar -x -C "$work/a"
  ab_objects=()
  local side src extra f
  for side in a b; do
    src=$([ $side = a ] && echo "$work/a/src" || echo "$PWD/src")
    extra=$([ $side = b ] && echo "${B_FLAGS:-}" || true)
    for f in "$@"; do
      [ -f "$src/$f" ] || continue
      g++ "${ab_flags[@]}" $extra -I"$src" -Dpm=pm_ab_$side -c "$src/$f" -o "$work/${side}_$(basename "$f" .cpp).o"
      ab_objects+=("$work/${side}_$(basename "$f" .cpp).o")
    done
    g++ "${ab_flags[@]}" -I"$src" -Dpm=pm_ab_$side -D"$macro"=run_$side -c "$runner" -o "$work/${side}_runner.o"
    ab_objects+=("$work/${side}_runner.o")
  done
}
