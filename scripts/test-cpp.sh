#!/usr/bin/env bash
# Tests the C++ wrapper (bindings/cpp/ember.hpp) against the release libember:
#
#   1. builds libember (cargo build --release -p ember-capi);
#   2. compiles capi/include/ember.h as C++ and ember.hpp alone as C++17 and C++20
#      (-Wpedantic -Wshadow -Wconversion, every method instantiated);
#   3. compiles examples/cpp/generate.cpp and examples/cpp/tests.cpp
#      (c++ -std=c++17 -Wall -Wextra -Werror, linked to libember.so);
#   4. writes the tiny random model and runs the tests on it (and on SmolLM2 when
#      EMBER_TEST_MODEL names its GGUF), then runs the generate example.
#
#   scripts/test-cpp.sh              CXX=clang++ scripts/test-cpp.sh
# Exits nonzero on any failure.
set -euo pipefail
cd "$(dirname "$0")/.."

CXX="${CXX:-c++}"
TARGET_DIR="${CARGO_TARGET_DIR:-target}"
# Quiet the Wayland probe of the Vulkan loader on headless machines.
export XDG_RUNTIME_DIR="${XDG_RUNTIME_DIR:-/tmp}"

log() { echo "test-cpp: $*" >&2; }

WORK="$(mktemp -d "${TMPDIR:-/tmp}/ember-cpp.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
start=$SECONDS

log "building libember (release)"
cargo build --release --locked -q -p ember-capi
LIB_DIR="$(cd "$TARGET_DIR/release" && pwd -P)"
test -f "$LIB_DIR/libember.so"

WARN=(-Wall -Wextra -Werror)
INC=(-I capi/include -I bindings/cpp)

log "ember.h as C++"
"$CXX" -x c++ -std=c++17 -fsyntax-only "${WARN[@]}" -Wpedantic capi/include/ember.h

log "ember.hpp alone, C++17 and C++20"
cat >"$WORK/header_only.cpp" <<'EOF'
// Compiles every part of ember.hpp that a TU can instantiate without running it.
#include <ember.hpp>
#include <array>
#include <vector>
#if __cplusplus >= 202002L
#include <span>
#endif
std::size_t views() {
    std::vector<uint32_t> v{1, 2, 3};
    const std::vector<uint32_t>& cv = v;
    std::array<uint64_t, 2> a{{1, 2}};
    ember::span<const uint32_t> s1(v), s2(cv), s3(v.data(), v.size()), s4 = {4, 5};
    ember::span<uint32_t> m(v);
    ember::span<const uint64_t> s5(a);
    std::size_t n = s1.size() + s2.size() + s3.size() + s4.size() + m.size() + s5.size();
#if __cplusplus >= 202002L
    std::span<const uint32_t> std_span(v);
    ember::span<const uint32_t> s6(std_span);
    n += s6.size();
#endif
    return n;
}
void api(ember::Context& ctx, const std::string& path) {
    ember::Model model(ctx, path, [](float) { return true; });
    ember::Session session(model, ember::SessionParams());
    ember::GenerateParams p;
    p.stop = {"\n"};
    ember::Generation g = session.generate("x", p, [](uint32_t, std::string_view) { return true; });
    (void)ember::to_string(g.stop_reason);
    std::vector<uint32_t> ids = model.tokenize("x", true, false);
    (void)model.detokenize(ids, true);
    (void)model.apply_chat_template({{"user", "x"}}, true);
    (void)session.evaluate(ids);
    (void)session.perplexity("x y", 2);
    uint64_t seq = session.add_sequence(ember::SamplerParams::greedy());
    (void)session.prefill(seq, ids);
    (void)session.decode({seq});
    session.remove_sequence(seq);
    ember::set_log_callback([](ember::LogLevel, std::string_view) {});
    (void)model.info();
    (void)ctx.info_json();
}
void train(ember::Model& model, ember::Session& session) {
    ember::TrainParams tp;
    tp.lora_targets = EMBER_TARGET_Q | EMBER_TARGET_V;
    tp.schedule = ember::LrSchedule::Constant;
    ember::Trainer tr(model, tp);
    (void)tr.step(ember::jsonl({ember::record::text("x"),
                                ember::record::prompt_completion("a", "b"),
                                ember::record::chat({{"user", "q"}, {"assistant", "a"}})}));
    (void)tr.step_tokens({{1, 2, 3}}, {{0, 1, 1}});
    (void)tr.train_file("d.jsonl", 2, 1, [](uint32_t, uint32_t, const ember::StepResult& r) {
        return r.loss > 0.0;
    });
    (void)tr.evaluate("{}");
    ember::Adapter a = tr.adapter();
    tr.save("dir");
    (void)tr.info_json();
    int32_t id = session.attach_adapter(a, "a");
    session.replace_adapter(id, a);
    session.set_adapter_scale(id, 0.5f);
    session.set_sequence_adapter(0, id);
    session.detach_adapter(id);
    ember::Adapter b(model, "dir");
    ember::Adapter c = ember::Adapter::combine({&a, &b}, {0.5f, 0.5f});
    c.save(model, "out");
    (void)c.info_json();
}
EOF
for std in c++17 c++20; do
  "$CXX" -std=$std -fsyntax-only "${WARN[@]}" -Wpedantic -Wshadow -Wconversion "${INC[@]}" \
    "$WORK/header_only.cpp"
done

log "compiling examples/cpp"
LINK=(-L "$LIB_DIR" -lember -Wl,-rpath,"$LIB_DIR")
"$CXX" -std=c++17 "${WARN[@]}" "${INC[@]}" examples/cpp/generate.cpp "${LINK[@]}" \
  -o "$WORK/generate"
"$CXX" -std=c++17 "${WARN[@]}" "${INC[@]}" examples/cpp/tests.cpp "${LINK[@]}" -ldl -pthread \
  -o "$WORK/tests"

log "writing the tiny model"
cargo run --locked -q -p ember-tests --example write_tiny -- "$WORK/tiny.gguf" llama gguf q4_1
cargo run --locked -q -p ember-tests --example write_tiny -- "$WORK/tiny-moe.gguf" mixtral gguf q8_0

if [ -n "${EMBER_TEST_MODEL:-}" ]; then
  log "running the tests (tiny model and $EMBER_TEST_MODEL)"
else
  log "running the tests (tiny model; set EMBER_TEST_MODEL for SmolLM2)"
fi
"$WORK/tests" "$WORK/tiny.gguf" "$WORK" "$WORK/tiny-moe.gguf"

log "running the generate example"
"$WORK/generate" "$WORK/tiny.gguf" "Hello" -n 8 >"$WORK/generate.out"
test -s "$WORK/generate.out"
if [ -n "${EMBER_TEST_MODEL:-}" ]; then
  "$WORK/generate" "$EMBER_TEST_MODEL" "The capital of France is" -n 8 >"$WORK/generate.out"
  grep -q Paris "$WORK/generate.out"
fi

log "all C++ tests passed ($((SECONDS - start)) s)"
