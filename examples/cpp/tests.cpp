// Self-checking tests of the C++ wrapper (bindings/cpp/ember.hpp), no test framework:
//
//     tests TINY.gguf [SCRATCH_DIR]
//
// TINY.gguf is the tiny random model (`cargo run -p ember-tests --example write_tiny -- ...`);
// SCRATCH_DIR (default /tmp) receives the malformed files the error tests load. When
// EMBER_TEST_MODEL names the SmolLM2 GGUF, the real-model tests run too. Exit status 0 when
// every check passed. scripts/test-cpp.sh builds and runs this.
//
// Handle accounting: this program defines ember_{context,model,session}_{create,load,free},
// ember_trainer_{create,free} and the adapter functions that make or free a handle itself and
// forwards to libember's through dlsym(RTLD_NEXT) (ELF symbol interposition, so Linux/glibc),
// recording every handle made and freed. That is how it checks that the RAII
// classes free each handle exactly once, in reverse order, and leak none.
#include <ember.hpp>

#include <dlfcn.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <mutex>
#include <set>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

// ---------------------------------------------------------------------------------------
// Handle accounting by interposition
// ---------------------------------------------------------------------------------------

namespace {

struct Event {
    bool create;  // false: free
    std::string kind;
    const void* handle;
};

std::mutex g_mutex;
std::vector<Event> g_events;
std::set<const void*> g_live;

void record(bool create, const char* kind, const void* handle) {
    if (handle == nullptr) return;  // failed creates and free(NULL) hold nothing
    std::lock_guard<std::mutex> lock(g_mutex);
    g_events.push_back({create, kind, handle});
    if (create) {
        g_live.insert(handle);
    } else {
        g_live.erase(handle);
    }
}

std::size_t live_handles() {
    std::lock_guard<std::mutex> lock(g_mutex);
    return g_live.size();
}

std::size_t event_count() {
    std::lock_guard<std::mutex> lock(g_mutex);
    return g_events.size();
}

std::vector<Event> events_since(std::size_t start) {
    std::lock_guard<std::mutex> lock(g_mutex);
    return std::vector<Event>(g_events.begin() + static_cast<std::ptrdiff_t>(start),
                              g_events.end());
}

template <typename F>
F real(const char* name) {
    void* f = dlsym(RTLD_NEXT, name);
    if (f == nullptr) {
        std::fprintf(stderr, "tests: dlsym(%s) failed; link against libember.so\n", name);
        std::abort();
    }
    return reinterpret_cast<F>(f);
}

}  // namespace

extern "C" ember_status ember_context_create(const ember_context_params* params,
                                             ember_context** out) {
    static const auto f = real<decltype(&ember_context_create)>("ember_context_create");
    const ember_status s = f(params, out);
    if (s == EMBER_OK) record(true, "context", *out);
    return s;
}

extern "C" void ember_context_free(ember_context* ctx) {
    static const auto f = real<decltype(&ember_context_free)>("ember_context_free");
    record(false, "context", ctx);
    f(ctx);
}

extern "C" ember_status ember_model_load(const ember_context* ctx, const char* path,
                                         const ember_model_params* params, ember_model** out) {
    static const auto f = real<decltype(&ember_model_load)>("ember_model_load");
    const ember_status s = f(ctx, path, params, out);
    if (s == EMBER_OK) record(true, "model", *out);
    return s;
}

extern "C" void ember_model_free(ember_model* model) {
    static const auto f = real<decltype(&ember_model_free)>("ember_model_free");
    record(false, "model", model);
    f(model);
}

extern "C" ember_status ember_session_create(const ember_model* model,
                                             const ember_session_params* params,
                                             ember_session** out) {
    static const auto f = real<decltype(&ember_session_create)>("ember_session_create");
    const ember_status s = f(model, params, out);
    if (s == EMBER_OK) record(true, "session", *out);
    return s;
}

extern "C" void ember_session_free(ember_session* session) {
    static const auto f = real<decltype(&ember_session_free)>("ember_session_free");
    record(false, "session", session);
    f(session);
}

extern "C" ember_status ember_adapter_load(const ember_model* model, const char* dir,
                                           ember_adapter** out) {
    static const auto f = real<decltype(&ember_adapter_load)>("ember_adapter_load");
    const ember_status s = f(model, dir, out);
    if (s == EMBER_OK) record(true, "adapter", *out);
    return s;
}

extern "C" ember_status ember_adapter_combine(const ember_adapter* const* adapters,
                                              const float* weights, size_t n,
                                              ember_adapter** out) {
    static const auto f = real<decltype(&ember_adapter_combine)>("ember_adapter_combine");
    const ember_status s = f(adapters, weights, n, out);
    if (s == EMBER_OK) record(true, "adapter", *out);
    return s;
}

extern "C" ember_status ember_trainer_get_adapter(ember_trainer* trainer, ember_adapter** out) {
    static const auto f = real<decltype(&ember_trainer_get_adapter)>("ember_trainer_get_adapter");
    const ember_status s = f(trainer, out);
    if (s == EMBER_OK) record(true, "adapter", *out);
    return s;
}

extern "C" void ember_adapter_free(ember_adapter* adapter) {
    static const auto f = real<decltype(&ember_adapter_free)>("ember_adapter_free");
    record(false, "adapter", adapter);
    f(adapter);
}

extern "C" ember_status ember_trainer_create(const ember_model* model,
                                             const ember_train_params* params,
                                             ember_trainer** out) {
    static const auto f = real<decltype(&ember_trainer_create)>("ember_trainer_create");
    const ember_status s = f(model, params, out);
    if (s == EMBER_OK) record(true, "trainer", *out);
    return s;
}

extern "C" void ember_trainer_free(ember_trainer* trainer) {
    static const auto f = real<decltype(&ember_trainer_free)>("ember_trainer_free");
    record(false, "trainer", trainer);
    f(trainer);
}

// ---------------------------------------------------------------------------------------
// A tiny test harness
// ---------------------------------------------------------------------------------------

namespace {

int g_checks = 0;
int g_failures = 0;

#define CHECK(cond)                                                                     \
    do {                                                                                \
        ++g_checks;                                                                     \
        if (!(cond)) {                                                                  \
            ++g_failures;                                                               \
            std::fprintf(stderr, "  FAIL %s:%d: %s\n", __FILE__, __LINE__, #cond);      \
        }                                                                               \
    } while (0)

// Runs `body`, which must throw E; `inspect` then checks the exception.
template <typename E, typename Body, typename Inspect>
void check_throws(const char* type, const char* file, int line, Body&& body, Inspect&& inspect) {
    ++g_checks;
    try {
        body();
    } catch (const E& e) {
        inspect(e);
        return;
    }
    ++g_failures;
    std::fprintf(stderr, "  FAIL %s:%d: did not throw %s\n", file, line, type);
}

#define CHECK_THROWS(E, ...) check_throws<E>(#E, __FILE__, __LINE__, __VA_ARGS__)

void run(const char* name, void (*test)()) {
    const int before = g_failures;
    std::fprintf(stderr, "test %s ...\n", name);
    try {
        test();
    } catch (const ember::Error& e) {
        ++g_failures;
        std::fprintf(stderr, "  FAIL: unexpected ember::Error %s\n", e.what());
    } catch (const std::exception& e) {
        ++g_failures;
        std::fprintf(stderr, "  FAIL: unexpected exception %s\n", e.what());
    } catch (...) {
        ++g_failures;
        std::fprintf(stderr, "  FAIL: unexpected non-standard exception\n");
    }
    std::fprintf(stderr, "  %s\n", g_failures == before ? "ok" : "FAILED");
}

std::string g_tiny;
std::string g_scratch = "/tmp";
std::string g_moe;  // a tiny Mixture-of-Experts GGUF (optional third argument)
ember::Context* g_ctx = nullptr;

std::string write_file(const std::string& name, const std::string& bytes) {
    const std::string path = g_scratch + "/" + name;
    std::ofstream f(path, std::ios::binary | std::ios::trunc);
    f.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
    f.close();
    if (!f) throw std::runtime_error("cannot write " + path);
    return path;
}

std::string read_prefix(const std::string& path, std::size_t n) {
    std::ifstream f(path, std::ios::binary);
    std::string s(n, '\0');
    f.read(&s[0], static_cast<std::streamsize>(n));
    s.resize(static_cast<std::size_t>(f.gcount()));
    return s;
}

ember::GenerateParams greedy(uint32_t max_tokens) {
    ember::GenerateParams p;
    p.max_tokens = max_tokens;
    p.sampler = ember::SamplerParams::greedy();
    return p;
}

struct Streamed {
    std::vector<uint32_t> tokens;
    std::string text;
};

// A generation that also records the streamed tokens and pieces.
ember::Generation generate_streamed(ember::Session& s, const std::string& prompt,
                                    const ember::GenerateParams& p, Streamed& out) {
    return s.generate(prompt, p, [&out](uint32_t t, std::string_view piece) {
        out.tokens.push_back(t);
        out.text.append(piece);
        return true;
    });
}

std::size_t argmax(const float* row, std::size_t n) {
    return static_cast<std::size_t>(std::max_element(row, row + n) - row);
}

// ---------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------

void test_version() {
    CHECK(ember::abi_compatible());
    CHECK(!ember::version().empty());
    CHECK(EMBER_CHECK_ABI());
}

void test_defaults_from_c() {
    const ember_sampler_params cs = ember_sampler_default_params();
    const ember::SamplerParams s;
    CHECK(s.temperature == cs.temperature && s.top_k == cs.top_k && s.top_p == cs.top_p);
    CHECK(s.min_p == cs.min_p && s.repeat_penalty == cs.repeat_penalty);
    CHECK(s.repeat_last_n == cs.repeat_last_n && s.seed == cs.seed);
    const ember_generate_params cg = ember_generate_default_params();
    const ember::GenerateParams g;
    CHECK(g.max_tokens == cg.max_tokens && g.chat == cg.chat && g.stop.empty());
    CHECK(g.adapter == cg.adapter && g.adapter_scale == cg.adapter_scale);
    CHECK(g.sampler.temperature == cg.sampler.temperature);
    const ember_session_params cp = ember_session_default_params();
    const ember::SessionParams p;
    CHECK(p.n_ctx == cp.n_ctx && p.n_seq == cp.n_seq && p.n_batch == cp.n_batch);
    CHECK(p.kv_budget == cp.kv_budget);
    CHECK(ember::SamplerParams::greedy().temperature == 0.0f);
}

// Scoped objects free their handles exactly once, in reverse order of construction, and a
// freed handle is dead in the library.
void test_raii_reverse_order() {
    const std::size_t live0 = live_handles();
    const std::size_t start = event_count();
    ember_context* raw_ctx = nullptr;
    ember_model* raw_model = nullptr;
    ember_session* raw_session = nullptr;
    {
        ember::Context ctx;
        ember::Model model(ctx, g_tiny);
        ember::Session session(model);
        raw_ctx = ctx.get();
        raw_model = model.get();
        raw_session = session.get();
        CHECK(raw_ctx != nullptr && raw_model != nullptr && raw_session != nullptr);
        CHECK(live_handles() == live0 + 3);
    }
    CHECK(live_handles() == live0);
    const std::vector<Event> ev = events_since(start);
    CHECK(ev.size() == 6);
    if (ev.size() == 6) {
        CHECK(ev[0].create && ev[0].kind == "context" && ev[0].handle == raw_ctx);
        CHECK(ev[1].create && ev[1].kind == "model" && ev[1].handle == raw_model);
        CHECK(ev[2].create && ev[2].kind == "session" && ev[2].handle == raw_session);
        CHECK(!ev[3].create && ev[3].kind == "session" && ev[3].handle == raw_session);
        CHECK(!ev[4].create && ev[4].kind == "model" && ev[4].handle == raw_model);
        CHECK(!ev[5].create && ev[5].kind == "context" && ev[5].handle == raw_ctx);
    }
    // The library agrees that the handles are gone.
    CHECK(ember_session_reset(raw_session) == EMBER_INVALID_ARGUMENT);
    ember_model_info info{};
    info.struct_size = sizeof info;
    CHECK(ember_model_get_info(raw_model, &info) == EMBER_INVALID_ARGUMENT);
    char* json = nullptr;
    CHECK(ember_context_info_json(raw_ctx, &json) == EMBER_INVALID_ARGUMENT);
    ember_string_free(json);
}

// Objects may also be destroyed out of order (the C library keeps what they need alive).
void test_out_of_order_lifetimes() {
    const std::size_t live0 = live_handles();
    std::unique_ptr<ember::Context> ctx(new ember::Context());
    std::unique_ptr<ember::Model> model(new ember::Model(*ctx, g_tiny));
    ember::Session session(*model);
    model.reset();
    ctx.reset();
    CHECK(live_handles() == live0 + 1);
    const ember::Generation g = session.generate("abc", greedy(4));
    CHECK(g.n_tokens == 4);
}

void test_move_semantics() {
    const std::size_t live0 = live_handles();
    ember::Model a(*g_ctx, g_tiny);
    ember_model* raw_a = a.get();
    ember::Model b(std::move(a));
    CHECK(!a && a.get() == nullptr);
    CHECK(b && b.get() == raw_a);
    CHECK(live_handles() == live0 + 1);
    // Using a moved-from object throws; it does not crash.
    CHECK_THROWS(ember::Error, [&] { a.info(); }, [](const ember::Error& e) {
        CHECK(e.status() == EMBER_INVALID_ARGUMENT);
        CHECK(!e.message().empty());
    });
    // Move assignment frees the target's old handle.
    ember::Model c(*g_ctx, g_tiny);
    ember_model* raw_c = c.get();
    CHECK(live_handles() == live0 + 2);
    c = std::move(b);
    CHECK(c.get() == raw_a && !b);
    CHECK(live_handles() == live0 + 1);
    ember_model_info info{};
    info.struct_size = sizeof info;
    CHECK(ember_model_get_info(raw_c, &info) == EMBER_INVALID_ARGUMENT);
    CHECK(ember_model_get_info(raw_a, &info) == EMBER_OK && info.vocab == 256);
    ember::Model& alias = c;
    c = std::move(alias);  // self-move keeps the handle
    CHECK(c.get() == raw_a);

    ember::Session s1(c);
    ember::Session s2(std::move(s1));
    CHECK(!s1 && s2);
    CHECK_THROWS(ember::Error, [&] { s1.generate("x", greedy(1)); },
                 [](const ember::Error& e) { CHECK(e.status() == EMBER_INVALID_ARGUMENT); });
    CHECK(s2.generate("x", greedy(2)).n_tokens == 2);

    // release() hands the handle over; adopt() takes it back.
    ember_session* raw = s2.release();
    CHECK(!s2 && raw != nullptr);
    ember::Session s3 = ember::Session::adopt(raw);
    CHECK(s3.get() == raw);
    CHECK(live_handles() == live0 + 2);
}

void test_error_missing_file() {
    const std::size_t live0 = live_handles();
    const std::string path = g_scratch + "/ember-cpp-no-such-model.gguf";
    std::remove(path.c_str());
    CHECK_THROWS(ember::Error, [&] { ember::Model(*g_ctx, path); }, [&](const ember::Error& e) {
        CHECK(e.status() == EMBER_IO);
        CHECK(std::string(e.status_name()) == "EMBER_IO");
        CHECK(e.message().find(path) != std::string::npos);
        CHECK(std::string(e.what()).find("EMBER_IO") == 0);
        CHECK(std::string(e.what()).find(e.message()) != std::string::npos);
    });
    // It is a std::runtime_error too.
    CHECK_THROWS(std::runtime_error, [&] { ember::Model(*g_ctx, path); },
                 [](const std::runtime_error& e) { CHECK(std::string(e.what()).size() > 10); });
    CHECK(live_handles() == live0);
}

void test_error_bad_gguf() {
    const std::size_t live0 = live_handles();
    const std::string garbage = write_file("ember-cpp-garbage.gguf", "this is not a model file");
    CHECK_THROWS(ember::Error, [&] { ember::Model(*g_ctx, garbage); }, [](const ember::Error& e) {
        CHECK(e.status() == EMBER_FORMAT);
        CHECK(e.message().find("GGUF") != std::string::npos);
    });
    // A real model cut short: the header promises more than the file holds.
    const std::string cut = write_file("ember-cpp-truncated.gguf", read_prefix(g_tiny, 1000));
    CHECK_THROWS(ember::Error, [&] { ember::Model(*g_ctx, cut); }, [&](const ember::Error& e) {
        CHECK(e.status() == EMBER_FORMAT);
        CHECK(e.message().find(cut) != std::string::npos);
    });
    std::remove(garbage.c_str());
    std::remove(cut.c_str());
    CHECK(live_handles() == live0);
}

void test_error_invalid_arguments() {
    ember::Model model(*g_ctx, g_tiny);
    ember::Session session(model);
    const auto invalid = [](const ember::Error& e) { CHECK(e.status() == EMBER_INVALID_ARGUMENT); };
    // A NUL byte cannot reach a NUL-terminated C string: rejected, not truncated.
    const std::string with_nul("ab\0cd", 5);
    CHECK_THROWS(ember::Error, [&] { session.generate(with_nul, greedy(1)); }, invalid);
    CHECK_THROWS(ember::Error, [&] { ember::Model(*g_ctx, g_tiny + with_nul); }, invalid);
    // tokenize takes a length, so NUL bytes are ordinary text there.
    CHECK(model.tokenize(std::string("a\0b", 3), false).size() == 3);
    // Ids outside the vocabulary (256) are the library's errors.
    CHECK_THROWS(ember::Error, [&] { model.detokenize({1, 2, 300}); }, invalid);
    CHECK_THROWS(ember::Error, [&] { session.evaluate(std::vector<uint32_t>{}); }, invalid);
    CHECK_THROWS(ember::Error, [&] { session.perplexity("", 16); }, invalid);
    CHECK_THROWS(ember::Error, [&] { session.remove_sequence(12345); }, [](const ember::Error& e) {
        CHECK(e.status() != EMBER_OK);
    });
    // The message belongs to the failed call.
    CHECK_THROWS(ember::Error, [&] { model.detokenize({999}); }, [](const ember::Error& e) {
        CHECK(e.message().find("ember_detokenize") != std::string::npos);
        CHECK(e.message().find("999") != std::string::npos);
    });
    // A model without a chat template says so.
    CHECK_THROWS(ember::Error, [&] { model.apply_chat_template({{"user", "hi"}}, true); },
                 [](const ember::Error& e) { CHECK(e.status() == EMBER_UNSUPPORTED); });
}

void test_model_info() {
    ember::Model model(*g_ctx, g_tiny);
    const ember::ModelInfo i = model.info();
    CHECK(i.vocab == 256 && i.hidden == 64 && i.n_layers == 2);
    CHECK(i.n_heads == 4 && i.n_kv_heads == 2 && i.head_dim == 16 && i.ff == 128);
    CHECK(i.train_ctx == 128 && i.bos == -1 && i.eos == -1 && i.n_params > 0);
    CHECK(model.info_json().find("\"config\"") != std::string::npos);
    CHECK(g_ctx->info_json().find('{') == 0);
}

void test_moe_expert_counts() {
    ember::Model model(*g_ctx, g_moe);
    const ember::ModelInfo i = model.info();
    CHECK(i.n_experts == 4 && i.n_experts_used == 2);
    CHECK(i.n_active_params > 0 && i.n_active_params < i.n_params);
    ember::SessionParams sp;
    sp.n_ctx = 64;
    ember::Session session(model, sp);
    CHECK(session.expert_counts() == std::vector<uint64_t>(8, 0));
    ember::GenerateParams p;
    p.max_tokens = 3;
    p.sampler.temperature = 0.0f;
    session.generate("Hello", p);
    const std::vector<uint64_t> c = session.expert_counts();
    CHECK(c.size() == 8);
    uint64_t layer0 = 0, layer1 = 0;
    for (int e = 0; e < 4; e++) {
        layer0 += c[e];
        layer1 += c[4 + e];
    }
    CHECK(layer0 == layer1 && layer0 > 0 && layer0 % 2 == 0);
    session.reset_expert_counts();
    CHECK(session.expert_counts() == std::vector<uint64_t>(8, 0));
    // A dense model has none.
    ember::Model dense(*g_ctx, g_tiny);
    CHECK(dense.info().n_experts == 0 && dense.info().n_active_params == dense.info().n_params);
    ember::Session ds(dense, sp);
    CHECK(ds.expert_counts().empty());
}

void test_load_progress() {
    const std::size_t live0 = live_handles();
    std::vector<float> seen;
    {
        ember::Model model(*g_ctx, g_tiny, [&seen](float f) {
            seen.push_back(f);
            return true;
        });
        CHECK(model);
    }
    CHECK(seen.size() >= 2);
    CHECK(std::is_sorted(seen.begin(), seen.end()));
    CHECK(!seen.empty() && seen.front() >= 0.0f && seen.back() <= 1.0f && seen.back() > 0.5f);

    // Returning false aborts the load.
    int calls = 0;
    const auto stop_at_second = [&calls](float) { return ++calls < 2; };
    CHECK_THROWS(ember::Error, [&] { ember::Model(*g_ctx, g_tiny, stop_at_second); },
                 [](const ember::Error& e) { CHECK(e.status() == EMBER_ABORTED); });
    CHECK(calls == 2);

    // An exception in the callback comes out of the constructor unchanged.
    struct LoadBoom {
        int code;
    };
    CHECK_THROWS(LoadBoom, [&] {
                     ember::Model(*g_ctx, g_tiny, [](float f) -> bool {
                         if (f > 0.3f) throw LoadBoom{42};
                         return true;
                     });
                 },
                 [](const LoadBoom& e) { CHECK(e.code == 42); });
    CHECK(live_handles() == live0);
}

void test_tokenize_round_trip() {
    ember::Model model(*g_ctx, g_tiny);
    const std::string text = "Hello, world! Ünïcödé ✓ — tabs\tand\nnewlines.";
    const std::vector<uint32_t> ids = model.tokenize(text, false);
    CHECK(ids.size() == text.size());  // byte-level vocabulary: one token per byte
    CHECK(!ids.empty() && ids[0] == static_cast<uint32_t>('H'));
    CHECK(model.detokenize(ids) == text);
    CHECK(model.detokenize(ids.data(), ids.size()) == text);
    CHECK(model.detokenize(ember::span<const uint32_t>(ids.data(), 5)) == "Hello");
    CHECK(model.tokenize("", false).empty());
    CHECK(model.detokenize(std::vector<uint32_t>{}).empty());
    // Long inputs take the resize path of both calls (more tokens and bytes than guessed).
    std::string longer;
    for (int i = 0; i < 500; ++i) longer += "x ";
    const std::vector<uint32_t> many = model.tokenize(longer, true);
    CHECK(many.size() == longer.size());
    CHECK(model.detokenize(many) == longer);
    std::string wide;
    for (int i = 0; i < 100; ++i) wide += "日本語";
    CHECK(model.detokenize(model.tokenize(wide, false)) == wide);
}

void test_greedy_deterministic() {
    ember::Model model(*g_ctx, g_tiny);
    ember::Session session(model);
    const ember::GenerateParams p = greedy(12);
    Streamed a, b;
    const ember::Generation ga = generate_streamed(session, "Once upon a time", p, a);
    const ember::Generation gb = generate_streamed(session, "Once upon a time", p, b);
    CHECK(ga.n_tokens == 12 && ga.stop_reason == ember::StopReason::Length);
    CHECK(ga.n_prompt_tokens == 16);
    CHECK(a.tokens.size() == ga.n_tokens);
    CHECK(a.tokens == b.tokens);
    CHECK(ga.text == gb.text);
    CHECK(a.text == ga.text);  // the streamed pieces make up the text
    CHECK(ga.prefill_tok_s > 0.0 && ga.decode_tok_s > 0.0);

    // A second session (another cache) agrees, and so does seeded sampling with itself.
    ember::Session other(model);
    CHECK(other.generate("Once upon a time", p).text == ga.text);
    ember::GenerateParams sampled;
    sampled.max_tokens = 12;
    sampled.sampler.seed = 1234;
    Streamed s1, s2;
    generate_streamed(session, "Once upon a time", sampled, s1);
    generate_streamed(other, "Once upon a time", sampled, s2);
    CHECK(s1.tokens == s2.tokens);

    // The first greedy token is the argmax of the prompt's last logits row.
    const std::vector<uint32_t> prompt = model.tokenize("Once upon a time", true, true);
    const std::vector<float> logits = session.evaluate(prompt);
    const std::size_t vocab = model.info().vocab;
    CHECK(logits.size() == prompt.size() * vocab);
    if (logits.size() == prompt.size() * vocab && !a.tokens.empty()) {
        CHECK(argmax(&logits[(prompt.size() - 1) * vocab], vocab) == a.tokens[0]);
    }
    CHECK(session.evaluate(prompt.data(), prompt.size()) == logits);
    CHECK(session.evaluate({79, 110, 99}).size() == 3 * vocab);
}

void test_callback_stop() {
    ember::Model model(*g_ctx, g_tiny);
    ember::Session session(model);
    int n = 0;
    const ember::Generation g =
        session.generate("abc", greedy(20), [&n](uint32_t, std::string_view) { return ++n < 5; });
    CHECK(n == 5);
    CHECK(g.stop_reason == ember::StopReason::Callback);
    CHECK(g.n_tokens == 5);
    CHECK(std::string(ember::to_string(g.stop_reason)) == "callback");
    // The session is usable again.
    CHECK(session.generate("abc", greedy(3)).n_tokens == 3);
}

void test_callback_exception() {
    const std::size_t live0 = live_handles();
    ember::Model model(*g_ctx, g_tiny);
    ember::Session session(model);
    struct TokenBoom {
        uint32_t token;
        int calls;
    };
    int calls = 0;
    const auto boom_at_third = [&calls](uint32_t t, std::string_view) -> bool {
        if (++calls == 3) throw TokenBoom{t, calls};
        return true;
    };
    CHECK_THROWS(TokenBoom, [&] { session.generate("abc", greedy(20), boom_at_third); },
                 [](const TokenBoom& e) { CHECK(e.calls == 3); });
    CHECK(calls == 3);  // no call after the throw
    // Standard exceptions keep their dynamic type (not turned into ember::Error).
    bool out_of_range = false;
    try {
        session.generate("abc", greedy(5), [](uint32_t, std::string_view) -> bool {
            throw std::out_of_range("from the callback");
        });
    } catch (const ember::Error&) {
        out_of_range = false;
    } catch (const std::out_of_range& e) {
        out_of_range = std::string(e.what()) == "from the callback";
    }
    CHECK(out_of_range);
    // The session's sequence slot came back: it generates again.
    CHECK(session.generate("abc", greedy(3)).n_tokens == 3);
    CHECK(live_handles() == live0 + 2);
}

void test_context_full() {
    ember::Model model(*g_ctx, g_tiny);
    ember::SessionParams sp;
    sp.n_ctx = 16;
    ember::Session session(model, sp);
    const ember::Generation g = session.generate("abcd", greedy(100));
    CHECK(g.stop_reason == ember::StopReason::Context);
    CHECK(g.n_prompt_tokens + g.n_tokens <= 17);
}

void test_sequences() {
    ember::Model model(*g_ctx, g_tiny);
    ember::SessionParams sp;
    sp.n_seq = 2;
    sp.n_ctx = 64;
    ember::Session session(model, sp);
    Streamed ref;
    generate_streamed(session, "The sky is", greedy(6), ref);
    CHECK(ref.tokens.size() == 6);

    const std::vector<uint32_t> prompt = model.tokenize("The sky is", true, true);
    const uint64_t s1 = session.add_sequence(ember::SamplerParams::greedy());
    const uint64_t s2 = session.add_sequence(ember::SamplerParams::greedy());
    CHECK(s1 != s2);
    CHECK_THROWS(ember::Error, [&] { session.add_sequence(); }, [](const ember::Error& e) {
        CHECK(e.status() != EMBER_OK);
    });
    std::vector<uint32_t> t1{session.prefill(s1, prompt)};
    std::vector<uint32_t> t2{session.prefill(s2, prompt.data(), prompt.size())};
    const std::vector<uint64_t> both{s1, s2};
    for (int i = 0; i < 5; ++i) {
        const std::vector<uint32_t> next = session.decode(both);
        CHECK(next.size() == 2);
        if (next.size() != 2) break;
        t1.push_back(next[0]);
        t2.push_back(next[1]);
    }
    CHECK(t1 == ref.tokens);
    CHECK(t2 == ref.tokens);
    // The pointer overload, one sequence.
    uint32_t next = 0;
    session.decode(&s1, 1, &next);
    session.remove_sequence(s1);
    CHECK_THROWS(ember::Error, [&] { session.remove_sequence(s1); }, [](const ember::Error& e) {
        CHECK(e.status() == EMBER_INVALID_ARGUMENT);
    });
    session.remove_sequence(s2);
    session.reset();
    CHECK(session.generate("The sky is", greedy(6)).n_tokens == 6);
}

void test_perplexity() {
    ember::Model model(*g_ctx, g_tiny);
    ember::Session session(model);
    const ember::Perplexity p =
        session.perplexity("the cat sat on the mat and the dog sat on the log.", 16);
    CHECK(std::isfinite(p.ppl) && p.ppl > 1.0);
    CHECK(p.scored > 0);
    const ember::Perplexity q =
        session.perplexity("the cat sat on the mat and the dog sat on the log.", 16);
    CHECK(q.ppl == p.ppl && q.scored == p.scored);
}

// One Model shared by four threads: each runs its own Session and tokenizes concurrently.
void test_model_shared_by_threads() {
    ember::Model model(*g_ctx, g_tiny);
    const std::string expected = ember::Session(model).generate("shared", greedy(8)).text;
    std::atomic<int> good{0};
    std::atomic<int> errors{0};
    std::vector<std::thread> threads;
    for (int t = 0; t < 4; ++t) {
        threads.emplace_back([&model, &expected, &good, &errors]() {
            try {
                ember::Session s(model);
                for (int i = 0; i < 2; ++i) {
                    const std::string text = "thread text " + std::to_string(i);
                    if (model.detokenize(model.tokenize(text, false)) != text) return;
                    if (s.generate("shared", greedy(8)).text != expected) return;
                }
                // An error on this thread carries this thread's message.
                try {
                    model.detokenize({777});
                } catch (const ember::Error& e) {
                    if (e.message().find("777") == std::string::npos) return;
                }
                ++good;
            } catch (...) {
                ++errors;
            }
        });
    }
    for (std::thread& t : threads) t.join();
    CHECK(good == 4);
    CHECK(errors == 0);
}

void test_log_callback() {
    std::atomic<int> messages{0};
    std::atomic<int> info{0};
    ember::set_log_callback([&](ember::LogLevel level, std::string_view m) {
        if (!m.empty()) ++messages;
        if (level == ember::LogLevel::Info) ++info;
        throw std::runtime_error("dropped by the trampoline");
    });
    { ember::Context ctx; }  // creating a context logs the device chosen
    ember::set_log_callback({});
    const int seen = messages;
    CHECK(seen >= 1 && info >= 1);
    { ember::Context ctx; }
    CHECK(messages == seen);  // cleared: no more calls
}

// ---------------------------------------------------------------------------------------
// Training and adapters
// ---------------------------------------------------------------------------------------

// A small LoRA on 32-token sequences at a constant high rate: the loss falls in a few steps.
ember::TrainParams fast_train_params() {
    ember::TrainParams p;
    p.lora_rank = 4;
    p.lora_targets = EMBER_TARGET_Q | EMBER_TARGET_V;
    p.seq_len = 32;
    p.lr = 1e-2f;
    p.schedule = ember::LrSchedule::Constant;
    return p;
}

const char* const kRecordText = "abcabcabcabcabcabc";

bool contains(const std::string& s, const std::string& part) {
    return s.find(part) != std::string::npos;
}

void test_train_defaults_from_c() {
    const ember_train_params c = ember_train_default_params();
    const ember::TrainParams p;
    CHECK(p.lora_rank == c.lora_rank && p.lora_alpha == c.lora_alpha && p.rslora == c.rslora);
    CHECK(p.lora_targets == c.lora_targets && p.prompt_tokens == c.prompt_tokens);
    CHECK(p.prefix_tokens == c.prefix_tokens && p.init_adapter == nullptr);
    CHECK(p.seq_len == c.seq_len && p.lr == c.lr && p.weight_decay == c.weight_decay);
    CHECK(p.max_grad_norm == c.max_grad_norm && p.beta1 == c.beta1 && p.beta2 == c.beta2);
    CHECK(p.eps == c.eps && static_cast<int>(p.schedule) == static_cast<int>(c.schedule));
    CHECK(p.warmup_steps == c.warmup_steps && p.total_steps == c.total_steps);
    CHECK(p.seed == c.seed && p.lora_experts == c.lora_experts && p.lora_top_k == c.lora_top_k);
    CHECK(p.switch_gates == c.switch_gates && p.balance_loss == c.balance_loss);
    CHECK(p.z_loss == c.z_loss);
    const ember_train_params back = p.to_c();
    CHECK(back.struct_size == sizeof(ember_train_params));
    CHECK(back.init_adapter == nullptr && back.schedule == c.schedule);
}

void test_records_are_json() {
    CHECK(ember::record::text("a\"b\\c\nd\te\x01") ==
          "{\"text\":\"a\\\"b\\\\c\\nd\\te\\u0001\"}");
    CHECK(ember::record::prompt_completion("Q", "A") == "{\"prompt\":\"Q\",\"completion\":\"A\"}");
    CHECK(ember::record::chat({{"user", "hi"}, {"assistant", "yo"}}) ==
          "{\"messages\":[{\"role\":\"user\",\"content\":\"hi\"},"
          "{\"role\":\"assistant\",\"content\":\"yo\"}]}");
    CHECK(ember::jsonl({"{}", "{}"}) == "{}\n{}\n");
}

// Teach the tiny model one record; the trained LoRA (snapshot, saved and reloaded, combined)
// serves in a session through every adapter call.
void test_trainer_learns_and_adapters_serve() {
    const std::size_t live0 = live_handles();
    ember::Model model(*g_ctx, g_tiny);
    const std::string data = ember::jsonl({ember::record::text(kRecordText)});
    const std::string dir = g_scratch + "/ember-cpp-adapter";
    {
        ember::Trainer trainer(model, fast_train_params());
        CHECK(live_handles() == live0 + 2);
        std::vector<double> losses;
        for (int i = 0; i < 20; ++i) {
            const ember::StepResult r = trainer.step(data);
            CHECK(!r.skipped && r.step == static_cast<uint32_t>(i + 1));
            CHECK(r.tokens == std::strlen(kRecordText) - 1 && r.lr == 1e-2f && r.seconds > 0.0);
            losses.push_back(r.loss);
        }
        CHECK(std::isfinite(losses[0]) && losses[5] < 0.8 * losses[0] && losses[19] < losses[5]);
        const std::string info = trainer.info_json();
        CHECK(contains(info, "\"steps\":20") && contains(info, "\"trainable_params\""));
        const double eval = trainer.evaluate(data);
        CHECK(std::isfinite(eval) && eval < losses[0]);
        CHECK(contains(trainer.info_json(), "\"steps\":20"));  // evaluate does not update

        ember::Adapter snapshot = trainer.adapter();
        CHECK(snapshot && contains(snapshot.info_json(), "\"rank\":4"));
        trainer.save(dir);
        ember::Adapter loaded(model, dir);
        CHECK(contains(loaded.info_json(), "q_proj") && contains(loaded.info_json(), "v_proj"));

        // Continuing from the saved adapter starts where this run is.
        ember::TrainParams cont = fast_train_params();
        cont.init_adapter = &loaded;
        ember::Trainer resumed(model, cont);
        CHECK(std::fabs(resumed.evaluate(data) - trainer.evaluate(data)) <
              1e-4 * trainer.evaluate(data));

        ember::SessionParams sp;
        sp.n_ctx = 64;
        sp.n_seq = 2;
        ember::Session session(model, sp);
        const int32_t id = session.attach_adapter(loaded, "trained");
        const int32_t snap_id = session.attach_adapter(snapshot);
        CHECK(id >= 0 && snap_id >= 0 && id != snap_id);
        const std::string prompt = "abcab";
        const ember::Generation base = session.generate(prompt, greedy(12));
        ember::GenerateParams p = greedy(12);
        p.adapter = id;
        const ember::Generation tuned = session.generate(prompt, p);
        CHECK(tuned.text != base.text);
        CHECK(tuned.text.rfind("cabcab", 0) == 0);  // it learned the pattern
        p.adapter = snap_id;
        CHECK(session.generate(prompt, p).text == tuned.text);

        // A sequence chooses its adapter.
        const std::vector<uint32_t> ids = model.tokenize(prompt, true, true);
        const uint64_t seq = session.add_sequence(ember::SamplerParams::greedy());
        session.set_sequence_adapter(seq, id);
        CHECK(session.prefill(seq, ids) == model.tokenize(tuned.text, false)[0]);
        session.remove_sequence(seq);

        // Task arithmetic: A - A is the base model; (A + A) / 2 is A.
        ember::Adapter none = ember::Adapter::combine({&loaded, &snapshot}, {1.0f, -1.0f});
        ember::Adapter same = ember::Adapter::combine({&loaded, &snapshot}, {0.5f, 0.5f});
        CHECK(contains(same.info_json(), "\"rank\":8"));
        const int32_t none_id = session.attach_adapter(none, "none");
        p.adapter = none_id;
        CHECK(session.generate(prompt, p).text == base.text);
        session.replace_adapter(none_id, same);  // hot swap
        CHECK(session.generate(prompt, p).text == tuned.text);
        session.set_adapter_scale(none_id, 0.0f);
        CHECK(session.generate(prompt, p).text == base.text);
        session.detach_adapter(none_id);
        CHECK_THROWS(ember::Error, [&] { session.generate(prompt, p); },
                     [](const ember::Error& e) { CHECK(e.status() == EMBER_INVALID_ARGUMENT); });
        CHECK_THROWS(ember::Error, [&] { ember::Adapter::combine({&loaded}, {1.0f, 2.0f}); },
                     [](const ember::Error& e) { CHECK(e.status() == EMBER_INVALID_ARGUMENT); });
        // The tiny base is Q4_1: merging into it would requantize, so it is refused.
        CHECK_THROWS(ember::Error, [&] { ember::merge_adapters(model, {&loaded}); },
                     [](const ember::Error& e) {
                         CHECK(e.status() == EMBER_UNSUPPORTED);
                         CHECK(contains(e.what(), "quantized"));
                     });

        // Saving the combined adapter and loading it again.
        same.save(model, dir + "-combined");
        CHECK(contains(ember::Adapter(model, dir + "-combined").info_json(), "\"rank\":8"));

        // Token sequences with a loss mask.
        const std::vector<std::vector<uint32_t>> seqs{{10, 20, 30, 40, 50, 60}, {7, 8, 9}};
        const ember::StepResult t1 = trainer.step_tokens(seqs, {{0, 0, 1, 1, 1, 1}, {1, 1, 1}});
        CHECK(!t1.skipped && t1.step == 21);
        CHECK(t1.tokens == 4 + 2);  // a sequence's first token is never predicted
        const ember::StepResult t2 = trainer.step_tokens(seqs);
        CHECK(t2.tokens == 5 + 2);
        CHECK_THROWS(ember::Error, [&] { trainer.step_tokens({{999, 3}}); },
                     [](const ember::Error& e) {
                         CHECK(e.status() == EMBER_INVALID_ARGUMENT);
                         CHECK(contains(e.message(), "vocabulary"));
                     });
        CHECK_THROWS(ember::Error, [&] { trainer.step_tokens(seqs, {{1, 1}}); },
                     [](const ember::Error& e) { CHECK(e.status() == EMBER_INVALID_ARGUMENT); });

        // Moves.
        ember::Trainer moved(std::move(trainer));
        CHECK(!trainer && moved);
        CHECK_THROWS(ember::Error, [&] { trainer.step(data); },
                     [](const ember::Error& e) { CHECK(e.status() == EMBER_INVALID_ARGUMENT); });
        ember::Adapter a2(std::move(snapshot));
        CHECK(!snapshot && a2);
    }
    CHECK(live_handles() == live0 + 1);  // the model
}

void test_train_file_callback() {
    const std::size_t live0 = live_handles();
    ember::Model model(*g_ctx, g_tiny);
    std::string lines;
    for (int i = 0; i < 6; ++i) {
        lines += ember::record::text("sample " + std::to_string(i) + " of text") + "\n";
    }
    const std::string path = write_file("ember-cpp-train.jsonl", lines);
    {
        ember::Trainer trainer(model, fast_train_params());
        std::vector<uint32_t> seen;
        CHECK_THROWS(ember::Error,
                     [&] {
                         trainer.train_file(path, 5, 2,
                                            [&](uint32_t step, uint32_t total,
                                                const ember::StepResult& r) {
                                                CHECK(total == 5 && std::isfinite(r.loss));
                                                seen.push_back(step);
                                                return step < 2;
                                            });
                     },
                     [](const ember::Error& e) {
                         CHECK(e.status() == EMBER_ABORTED);
                         CHECK(contains(e.message(), "after 2 steps"));
                     });
        CHECK((seen == std::vector<uint32_t>{1, 2}));
        CHECK(contains(trainer.info_json(), "\"steps\":2"));  // the steps done are kept

        const double loss = trainer.train_file(path, 2, 3);
        CHECK(std::isfinite(loss) && loss > 0.0);
        CHECK(contains(trainer.info_json(), "\"steps\":4"));

        struct TrainBoom {
            uint32_t step;
        };
        int calls = 0;
        CHECK_THROWS(TrainBoom,
                     [&] {
                         trainer.train_file(path, 5, 2,
                                            [&](uint32_t step, uint32_t, const ember::StepResult&)
                                                -> bool {
                                                ++calls;
                                                throw TrainBoom{step};
                                            });
                     },
                     [](const TrainBoom& e) { CHECK(e.step == 1); });
        CHECK(calls == 1);
        CHECK(std::isfinite(trainer.train_file(path, 1, 2)));  // still usable
    }
    std::remove(path.c_str());
    CHECK(live_handles() == live0 + 1);  // the model
}

void test_trainer_errors() {
    const std::size_t live0 = live_handles();
    ember::Model model(*g_ctx, g_tiny);
    const auto invalid_with = [](const char* part) {
        return [part](const ember::Error& e) {
            CHECK(e.status() == EMBER_INVALID_ARGUMENT);
            CHECK(contains(e.message(), part));
        };
    };
    ember::TrainParams p = fast_train_params();
    p.seq_len = 33;
    CHECK_THROWS(ember::Error, [&] { ember::Trainer(model, p); }, invalid_with("multiple of 32"));
    p = fast_train_params();
    p.lora_experts = 4;
    p.lora_top_k = 5;
    CHECK_THROWS(ember::Error, [&] { ember::Trainer(model, p); }, invalid_with("top-5"));
    p = fast_train_params();
    p.lora_rank = 0;
    CHECK_THROWS(ember::Error, [&] { ember::Trainer(model, p); },
                 invalid_with("nothing to train"));
    p = fast_train_params();
    p.lr = -1.0f;
    CHECK_THROWS(ember::Error, [&] { ember::Trainer(model, p); }, invalid_with("lr"));
    CHECK_THROWS(ember::Error, [&] { ember::Adapter(model, g_scratch + "/ember-cpp-no-adapter"); },
                 [](const ember::Error& e) { CHECK(e.status() == EMBER_IO); });

    ember::Trainer trainer(model, fast_train_params());
    CHECK_THROWS(ember::Error, [&] { trainer.step("{\"question\": 1}"); }, invalid_with("line 1"));
    CHECK_THROWS(ember::Error, [&] { trainer.step("not json"); }, invalid_with("JSON"));
    CHECK_THROWS(ember::Error, [&] { trainer.evaluate(""); }, invalid_with("no training records"));
    CHECK_THROWS(ember::Error, [&] { trainer.step(std::string("{}\0", 3)); }, invalid_with("NUL"));
    CHECK_THROWS(ember::Error,
                 [&] { trainer.train_file(g_scratch + "/ember-cpp-none.jsonl", 1, 1); },
                 [](const ember::Error& e) { CHECK(e.status() == EMBER_IO); });
    CHECK_THROWS(ember::Error, [&] { trainer.train_file(g_scratch + "/x.jsonl", 0, 1); },
                 invalid_with("positive"));
    CHECK(contains(trainer.info_json(), "\"steps\":0"));

    // A soft prompt alone has no LoRA to snapshot.
    ember::TrainParams soft;
    soft.lora_rank = 0;
    soft.prompt_tokens = 4;
    soft.seq_len = 32;
    ember::Trainer prompt_trainer(model, soft);
    CHECK(contains(prompt_trainer.info_json(), "\"virtual_tokens\":4"));
    CHECK_THROWS(ember::Error, [&] { prompt_trainer.adapter(); },
                 [](const ember::Error& e) { CHECK(e.status() == EMBER_UNSUPPORTED); });
    CHECK(live_handles() == live0 + 3);
}

// SmolLM2-135M-Instruct, when EMBER_TEST_MODEL names it.
void test_real_model() {
    const char* path = std::getenv("EMBER_TEST_MODEL");
    ember::Model model(*g_ctx, path);
    const ember::ModelInfo info = model.info();
    CHECK(info.vocab == 49152 && info.n_layers == 30);
    CHECK(info.eos >= 0 && model.is_eog(static_cast<uint32_t>(info.eos)));
    ember::SessionParams sp;
    sp.n_ctx = 256;
    ember::Session session(model, sp);

    Streamed streamed;
    const ember::Generation g =
        generate_streamed(session, "The capital of France is", greedy(16), streamed);
    std::fprintf(stderr, "  greedy: \"%s\" (%u tokens, %s, %.1f tok/s prefill, %.1f decode)\n",
                 g.text.c_str(), g.n_tokens, ember::to_string(g.stop_reason), g.prefill_tok_s,
                 g.decode_tok_s);
    CHECK(g.text.find("Paris") != std::string::npos);
    CHECK(streamed.text == g.text);

    // A stop string ends the text before it.
    ember::GenerateParams p = greedy(16);
    p.stop = {"Paris"};
    const ember::Generation s = session.generate("The capital of France is", p);
    CHECK(s.stop_reason == ember::StopReason::StopString);
    CHECK(s.text.find("Paris") == std::string::npos);
    CHECK(g.text.find(s.text) == 0);

    // Chat template and special tokens.
    const std::string chat = model.apply_chat_template(
        {{"system", "You are helpful."}, {"user", "What is the capital of France?"}}, true);
    CHECK(chat.find("<|im_start|>user\nWhat is the capital of France?") != std::string::npos);
    const std::string opening = "<|im_start|>assistant\n";
    CHECK(chat.size() > opening.size() &&
          chat.compare(chat.size() - opening.size(), opening.size(), opening) == 0);
    CHECK(model.tokenize("<|im_start|>", false, true).size() == 1);
    CHECK(model.tokenize("<|im_start|>", false, false).size() > 1);
    const std::string text = "Ember runs language models on any GPU. Ünïcödé ✓";
    CHECK(model.detokenize(model.tokenize(text, false)) == text);

    ember::GenerateParams cp = greedy(24);
    cp.chat = true;
    const ember::Generation c = session.generate("What is the capital of France?", cp);
    std::fprintf(stderr, "  chat: \"%s\" (%s)\n", c.text.c_str(), ember::to_string(c.stop_reason));
    CHECK(c.text.find("Paris") != std::string::npos);

    const ember::Perplexity ppl = session.perplexity(
        "The quick brown fox jumps over the lazy dog. Paris is the capital of France, and "
        "Berlin is the capital of Germany.",
        64);
    CHECK(std::isfinite(ppl.ppl) && ppl.ppl > 1.0 && ppl.ppl < 1000.0);
}

}  // namespace

// A mixture of LoRA experts trains with its auxiliary losses and reports its expert load.
void test_mixture_of_lora_experts() {
    ember::Model model(*g_ctx, g_tiny);
    const std::string data = ember::jsonl({ember::record::text(kRecordText)});
    ember::TrainParams p = fast_train_params();
    p.lora_experts = 4;
    p.lora_top_k = 2;
    p.balance_loss = 0.05f;
    ember::Trainer trainer(model, p);
    double first = 0.0, last = 0.0;
    for (int i = 0; i < 8; ++i) {
        const ember::StepResult r = trainer.step(data);
        CHECK(!r.skipped && r.aux_loss > 0.0);
        (i == 0 ? first : last) = r.loss;
    }
    CHECK(last < first);
    CHECK(contains(trainer.info_json(), "\"expert_load\":[{"));
    CHECK(contains(trainer.adapter().info_json(), "\"experts\":4"));
}

int main(int argc, char** argv) {
    if (argc < 2) {
        std::fprintf(stderr, "usage: %s TINY.gguf [SCRATCH_DIR [TINY_MOE.gguf]]\n", argv[0]);
        return 2;
    }
    g_tiny = argv[1];
    if (argc > 2) g_scratch = argv[2];
    if (argc > 3) g_moe = argv[3];

    run("version", test_version);
    run("defaults_from_c", test_defaults_from_c);
    run("raii_reverse_order", test_raii_reverse_order);
    {
        ember::Context ctx;
        g_ctx = &ctx;
        run("out_of_order_lifetimes", test_out_of_order_lifetimes);
        run("move_semantics", test_move_semantics);
        run("error_missing_file", test_error_missing_file);
        run("error_bad_gguf", test_error_bad_gguf);
        run("error_invalid_arguments", test_error_invalid_arguments);
        run("model_info", test_model_info);
        if (!g_moe.empty()) {
            run("moe_expert_counts", test_moe_expert_counts);
        } else {
            std::fprintf(stderr, "test moe_expert_counts ... skipped (no TINY_MOE.gguf)\n");
        }
        run("load_progress", test_load_progress);
        run("tokenize_round_trip", test_tokenize_round_trip);
        run("greedy_deterministic", test_greedy_deterministic);
        run("callback_stop", test_callback_stop);
        run("callback_exception", test_callback_exception);
        run("context_full", test_context_full);
        run("sequences", test_sequences);
        run("perplexity", test_perplexity);
        run("model_shared_by_threads", test_model_shared_by_threads);
        run("log_callback", test_log_callback);
        run("train_defaults_from_c", test_train_defaults_from_c);
        run("records_are_json", test_records_are_json);
        run("trainer_learns_and_adapters_serve", test_trainer_learns_and_adapters_serve);
        run("train_file_callback", test_train_file_callback);
        run("trainer_errors", test_trainer_errors);
        run("mixture_of_lora_experts", test_mixture_of_lora_experts);
        const char* real_model = std::getenv("EMBER_TEST_MODEL");
        if (real_model != nullptr && *real_model != '\0') {
            run("real_model", test_real_model);
        } else {
            std::fprintf(stderr, "test real_model ... skipped (EMBER_TEST_MODEL is not set)\n");
        }
        g_ctx = nullptr;
    }
    // Every handle the tests made has been freed.
    ++g_checks;
    if (live_handles() != 0) {
        ++g_failures;
        std::fprintf(stderr, "FAIL: %zu handles leaked\n", live_handles());
    }
    std::fprintf(stderr, "%d checks, %d failed, %zu handles made and freed\n", g_checks,
                 g_failures, event_count() / 2);
    return g_failures == 0 ? 0 : 1;
}
