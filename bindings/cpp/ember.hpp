// ember.hpp — header-only C++17 RAII wrapper over Ember's C interface (capi/include/ember.h).
//
// Build:  c++ -std=c++17 -I capi/include -I bindings/cpp app.cpp -L target/release -lember
//
// Conventions
// - Every handle class (Context, Model, Session, Adapter, Trainer) owns exactly one C handle:
//   move-only, the destructor frees it, a moved-from object holds no handle (using it throws
//   an Error with EMBER_INVALID_ARGUMENT; destroying it does nothing).
// - Every C call's status is checked: a failure throws ember::Error, which carries the
//   ember_status and the message of ember_last_error() read on the failing thread.
// - Text goes in as std::string_view. Where the C interface needs a NUL-terminated string the
//   text is copied into a std::string; text containing a NUL byte there is rejected with
//   EMBER_INVALID_ARGUMENT before the C call (it would otherwise be cut short silently).
// - Callbacks are std::function. An exception thrown by a callback is caught before it can
//   reach the C library, stops the operation, and is rethrown unchanged (same type, same
//   object) once the C call has returned. No C++ exception ever unwinds through libember.
//
// Lifetimes and thread safety (those of ember.h)
// - A Model keeps the device of its Context alive, and a Session (or Trainer) keeps its Model
//   alive, so the objects may be destroyed in any order; scoped objects are destroyed in
//   reverse order of construction anyway.
// - Context and Model are thread-safe: their const methods may be called from any number of
//   threads at once, and many Sessions on many threads may share one Model (pass it by const
//   reference; do not move or destroy it while other threads use it).
// - A Session must be used by one thread at a time; different Sessions run in parallel. So
//   must a Trainer (the Model it trains may serve Sessions meanwhile). An Adapter is
//   immutable and thread-safe; Sessions it is attached to keep their own copy.
// - The log callback (set_log_callback) may be called from any thread Ember runs on.
#ifndef EMBER_HPP
#define EMBER_HPP

#include <ember.h>

#include <cstddef>
#include <cstdint>
#include <exception>
#include <functional>
#include <initializer_list>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>
#include <vector>

namespace ember {

// ---------------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------------

/// The exception thrown when an Ember call fails: the C status (status()) and the library's
/// detailed message (message(), from ember_last_error()). what() is "<STATUS_NAME>: <message>",
/// e.g. "EMBER_IO: ember_model_load: ...".
class Error : public std::runtime_error {
public:
    /// An error with `status` and the detailed `message` (no status prefix).
    Error(ember_status status, std::string message)
        : std::runtime_error(std::string(ember_status_str(static_cast<int32_t>(status))) + ": " +
                             message),
          status_(status),
          message_(std::move(message)) {}

    /// The status of the failed call (never EMBER_OK).
    ember_status status() const noexcept { return status_; }

    /// The status name, e.g. "EMBER_FORMAT" (a static string).
    const char* status_name() const noexcept {
        return ember_status_str(static_cast<int32_t>(status_));
    }

    /// The library's detailed message (ember_last_error() at the time of the failure).
    const std::string& message() const noexcept { return message_; }

private:
    ember_status status_;
    std::string message_;
};

namespace detail {

/// Throws Error for a failed `status`, with this thread's ember_last_error().
inline void check(ember_status status) {
    if (status == EMBER_OK) return;
    const char* msg = ember_last_error();
    std::string m = (msg != nullptr && *msg != '\0')
                        ? std::string(msg)
                        : std::string(ember_status_str(static_cast<int32_t>(status)));
    throw Error(status, std::move(m));
}

/// Copies `s` into a NUL-terminated string for the C interface; rejects embedded NULs.
inline std::string c_string(std::string_view s, const char* what) {
    if (s.find('\0') != std::string_view::npos) {
        throw Error(EMBER_INVALID_ARGUMENT,
                    std::string("ember.hpp: ") + what + " contains a NUL byte");
    }
    return std::string(s);
}

/// Takes ownership of a string Ember returned through `char **` and frees it.
inline std::string take_string(char* s) {
    if (s == nullptr) return std::string();
    struct Free {
        char* p;
        ~Free() { ember_string_free(p); }
    } guard{s};
    return std::string(s);
}

/// A non-NULL pointer for an empty input (the C interface rejects NULL even when n is 0 in
/// some calls; any pointer is valid for zero elements).
template <typename T>
inline const T* non_null(const T* p) noexcept {
    static const T dummy{};
    return p != nullptr ? p : &dummy;
}

}  // namespace detail

// ---------------------------------------------------------------------------------------
// Small value types
// ---------------------------------------------------------------------------------------

/// A minimal read-only view of contiguous elements (C++17 has no std::span): built from a
/// pointer and a count, a std::vector, a std::array, a std::span (C++20), an initializer list
/// (valid for the full expression only) or any contiguous container with data() and size().
/// It does not own the elements: they must outlive the view.
template <typename T>
class span {
public:
    /// Element type (const-qualified as given).
    using element_type = T;
    /// Value type (without const).
    using value_type = std::remove_cv_t<T>;

    /// An empty view.
    constexpr span() noexcept = default;
    /// `size` elements starting at `data` (`data` may be NULL when `size` is 0).
    constexpr span(T* data, std::size_t size) noexcept : data_(data), size_(size) {}
    /// The elements of a contiguous container (vector, array, std::span, ...).
    template <typename C,
              typename = std::enable_if_t<
                  !std::is_same_v<std::decay_t<C>, span> &&
                  std::is_convertible_v<decltype(std::declval<C&>().data()), T*> &&
                  std::is_convertible_v<decltype(std::declval<C&>().size()), std::size_t>>>
    constexpr span(C& c) noexcept : data_(c.data()), size_(c.size()) {}
    /// The elements of a temporary or const contiguous container (read-only views only).
    template <typename C,
              typename = std::enable_if_t<
                  std::is_const_v<T> && !std::is_same_v<std::decay_t<C>, span> &&
                  std::is_convertible_v<decltype(std::declval<const C&>().data()), T*> &&
                  std::is_convertible_v<decltype(std::declval<const C&>().size()), std::size_t>>,
              typename = void>
    constexpr span(const C& c) noexcept : data_(c.data()), size_(c.size()) {}
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Winit-list-lifetime"
#endif
    /// The elements of a braced list, e.g. `session.evaluate({1, 2, 3})`: like any view of a
    /// temporary, valid until the end of the full expression (so only as an argument).
    template <typename U = T, typename = std::enable_if_t<std::is_const_v<U>>>
    constexpr span(std::initializer_list<value_type> il) noexcept
        : data_(il.begin()), size_(il.size()) {}
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif

    /// Pointer to the first element (may be NULL when empty).
    constexpr T* data() const noexcept { return data_; }
    /// Number of elements.
    constexpr std::size_t size() const noexcept { return size_; }
    /// Whether there are no elements.
    constexpr bool empty() const noexcept { return size_ == 0; }
    /// Element `i` (unchecked).
    constexpr T& operator[](std::size_t i) const noexcept { return data_[i]; }
    /// Iterator to the first element.
    constexpr T* begin() const noexcept { return data_; }
    /// Iterator past the last element.
    constexpr T* end() const noexcept { return data_ + size_; }

private:
    T* data_ = nullptr;
    std::size_t size_ = 0;
};

/// The library's version string, e.g. "0.1.0".
inline std::string version() { return ember_version(); }

/// Whether the loaded library has the ABI of the ember.h this code was compiled against.
inline bool abi_compatible() noexcept { return ember_abi_version() == EMBER_ABI_VERSION; }

/// Log levels of set_log_callback.
enum class LogLevel : int {
    /// Errors.
    Error = EMBER_LOG_ERROR,
    /// Warnings.
    Warn = EMBER_LOG_WARN,
    /// Information (device chosen, model loaded).
    Info = EMBER_LOG_INFO,
    /// Debugging detail.
    Debug = EMBER_LOG_DEBUG,
};

/// Receives Ember's log messages (the view is valid only during the call).
using LogCallback = std::function<void(LogLevel, std::string_view)>;

namespace detail {

struct LogState {
    std::mutex mutex;
    std::shared_ptr<const LogCallback> callback;
};

// Never destroyed, so a message logged by another thread during exit finds it alive.
inline LogState& log_state() {
    static LogState* state = new LogState();
    return *state;
}

inline void log_trampoline(enum ember_log_level level, const char* message, void*) noexcept {
    std::shared_ptr<const LogCallback> cb;
    {
        LogState& s = log_state();
        std::lock_guard<std::mutex> lock(s.mutex);
        cb = s.callback;
    }
    if (!cb || !*cb) return;
    try {
        (*cb)(static_cast<LogLevel>(level), message != nullptr ? message : "");
    } catch (...) {
        // A log callback cannot stop anything: its exceptions are dropped.
    }
}

}  // namespace detail

/// Sets the process-wide log callback (an empty function clears it). Thread-safe. The
/// callback may run on any thread Ember uses, also while it is being replaced (the old one
/// finishes its call). Exceptions it throws are caught and dropped.
inline void set_log_callback(LogCallback callback) {
    detail::LogState& s = detail::log_state();
    const bool on = static_cast<bool>(callback);
    {
        std::lock_guard<std::mutex> lock(s.mutex);
        s.callback = on ? std::make_shared<const LogCallback>(std::move(callback)) : nullptr;
    }
    ember_set_log_callback(on ? &detail::log_trampoline : nullptr, nullptr);
}

/// How to create a Context; the defaults are ember_context_default_params()'s.
struct ContextParams {
    /// "vulkan", "metal", "dx12", "gl" or "any"; empty reads the EMBER_BACKEND variable.
    std::string backend;
    /// Adapter index ("0") or name substring; empty reads the EMBER_ADAPTER variable.
    std::string adapter;
    /// Device memory budget in bytes (0: the device's limits).
    uint64_t memory_budget;
    /// Do not use SHADER_F16 even if available.
    bool disable_f16;
    /// Do not use subgroup operations even if available.
    bool disable_subgroups;

    /// The library's defaults.
    ContextParams() {
        const ember_context_params d = ember_context_default_params();
        if (d.backend != nullptr) backend = d.backend;
        if (d.adapter != nullptr) adapter = d.adapter;
        memory_budget = d.memory_budget;
        disable_f16 = d.disable_f16;
        disable_subgroups = d.disable_subgroups;
    }
};

/// Sizes of a Session; the defaults are ember_session_default_params()'s.
struct SessionParams {
    /// Tokens each sequence can hold (0: the model's training context, capped by kv_budget).
    uint32_t n_ctx;
    /// Sequences that can be active at once.
    uint32_t n_seq;
    /// Tokens per prefill chunk.
    uint32_t n_batch;
    /// Bytes the key/value cache may take (0: no limit beyond the device's).
    uint64_t kv_budget;

    /// The library's defaults (2048 tokens, 1 sequence, 256-token prefill chunks).
    SessionParams() {
        const ember_session_params d = ember_session_default_params();
        n_ctx = d.n_ctx;
        n_seq = d.n_seq;
        n_batch = d.n_batch;
        kv_budget = d.kv_budget;
    }

    /// The C struct (struct_size set).
    ember_session_params to_c() const {
        ember_session_params p = ember_session_default_params();
        p.n_ctx = n_ctx;
        p.n_seq = n_seq;
        p.n_batch = n_batch;
        p.kv_budget = kv_budget;
        return p;
    }
};

/// How a sequence picks tokens; the defaults are ember_sampler_default_params()'s
/// (temperature 0.8, top-k 40, top-p 0.95, min-p 0.05, no penalty, seed 0).
struct SamplerParams {
    /// Temperature; 0 = greedy.
    float temperature;
    /// Top-k (0 = off; at most 1024 tokens are considered).
    uint32_t top_k;
    /// Top-p (1 = off).
    float top_p;
    /// Min-p (0 = off).
    float min_p;
    /// Repetition penalty (1 = off).
    float repeat_penalty;
    /// Recent tokens the penalty looks at (at most 256).
    uint32_t repeat_last_n;
    /// Random seed.
    uint64_t seed;

    /// The library's defaults.
    SamplerParams() : SamplerParams(ember_sampler_default_params()) {}

    /// The values of a C struct.
    explicit SamplerParams(const ember_sampler_params& p)
        : temperature(p.temperature),
          top_k(p.top_k),
          top_p(p.top_p),
          min_p(p.min_p),
          repeat_penalty(p.repeat_penalty),
          repeat_last_n(p.repeat_last_n),
          seed(p.seed) {}

    /// Greedy decoding (temperature 0; the other fields keep their defaults).
    static SamplerParams greedy() {
        SamplerParams p;
        p.temperature = 0.0f;
        return p;
    }

    /// The C struct (struct_size set).
    ember_sampler_params to_c() const {
        ember_sampler_params p = ember_sampler_default_params();
        p.temperature = temperature;
        p.top_k = top_k;
        p.top_p = top_p;
        p.min_p = min_p;
        p.repeat_penalty = repeat_penalty;
        p.repeat_last_n = repeat_last_n;
        p.seed = seed;
        return p;
    }
};

/// What Session::generate produces; the defaults are ember_generate_default_params()'s
/// (128 tokens, default sampling, no stop strings, no chat template, base model).
struct GenerateParams {
    /// Tokens to generate at most.
    uint32_t max_tokens;
    /// Sampling.
    SamplerParams sampler;
    /// Stop strings: generation ends when one appears (it is not included in the text).
    std::vector<std::string> stop;
    /// Wrap the prompt as a user message of the model's chat template.
    bool chat;
    /// Adapter to generate with: an id from ember_session_attach_adapter (on
    /// Session::get()), or -1 for the base model.
    int32_t adapter;
    /// Strength of `adapter` (default 1).
    float adapter_scale;

    /// The library's defaults.
    GenerateParams() {
        const ember_generate_params d = ember_generate_default_params();
        max_tokens = d.max_tokens;
        sampler = SamplerParams(d.sampler);
        chat = d.chat;
        adapter = d.adapter;
        adapter_scale = d.adapter_scale;
    }
};

/// Why a generation ended (the values of ember_stop_reason).
enum class StopReason : int {
    /// End-of-generation token.
    Eos = EMBER_STOP_EOS,
    /// max_tokens reached.
    Length = EMBER_STOP_LENGTH,
    /// A stop string appeared (not included in the text).
    StopString = EMBER_STOP_STRING,
    /// The context is full.
    Context = EMBER_STOP_CONTEXT,
    /// The token callback returned false.
    Callback = EMBER_STOP_CALLBACK,
};

/// A short name of a stop reason: "eos", "length", "stop_string", "context" or "callback".
inline const char* to_string(StopReason r) noexcept {
    switch (r) {
        case StopReason::Eos: return "eos";
        case StopReason::Length: return "length";
        case StopReason::StopString: return "stop_string";
        case StopReason::Context: return "context";
        case StopReason::Callback: return "callback";
    }
    return "unknown";
}

/// The outcome of Session::generate.
struct Generation {
    /// The generated text (without the prompt, without a matched stop string).
    std::string text;
    /// Prompt tokens (after the chat template and BOS, when used).
    uint32_t n_prompt_tokens = 0;
    /// Generated tokens.
    uint32_t n_tokens = 0;
    /// Why it ended.
    StopReason stop_reason = StopReason::Length;
    /// Prompt processing speed (tokens/s).
    double prefill_tok_s = 0.0;
    /// Generation speed (tokens/s).
    double decode_tok_s = 0.0;
};

/// Numbers describing a loaded model (ember_model_info).
struct ModelInfo {
    /// Vocabulary size.
    uint32_t vocab = 0;
    /// Hidden size.
    uint32_t hidden = 0;
    /// Transformer blocks.
    uint32_t n_layers = 0;
    /// Query heads.
    uint32_t n_heads = 0;
    /// Key/value heads.
    uint32_t n_kv_heads = 0;
    /// Head size.
    uint32_t head_dim = 0;
    /// Feed-forward size.
    uint32_t ff = 0;
    /// Training context length.
    uint32_t train_ctx = 0;
    /// BOS token id, or -1.
    int32_t bos = -1;
    /// EOS token id, or -1.
    int32_t eos = -1;
    /// Parameter count.
    uint64_t n_params = 0;
    /// Device bytes taken by the weights.
    uint64_t weight_bytes = 0;
    /// Routed experts per layer of a Mixture-of-Experts model (0 for a dense model).
    uint32_t n_experts = 0;
    /// Experts each token uses (0 for a dense model).
    uint32_t n_experts_used = 0;
    /// Parameters one token goes through (n_params for a dense model).
    uint64_t n_active_params = 0;
};

/// One chat message for Model::apply_chat_template.
struct ChatMessage {
    /// "system", "user" or "assistant".
    std::string role;
    /// The text.
    std::string content;
};

/// Perplexity of a text (Session::perplexity).
struct Perplexity {
    /// The perplexity (llama.cpp's definition).
    double ppl = 0.0;
    /// Number of tokens scored.
    std::size_t scored = 0;
};

/// Load progress: receives the fraction done (0..1); return false to abort the load.
using ProgressCallback = std::function<bool(float)>;

/// Token streaming: receives each generated token and the text it completes (empty while a
/// UTF-8 character is incomplete; the view is valid only during the call). Return false to
/// stop: the Generation then reports StopReason::Callback.
using TokenCallback = std::function<bool(uint32_t, std::string_view)>;

// ---------------------------------------------------------------------------------------
// Context
// ---------------------------------------------------------------------------------------

/// A GPU device and its caches (ember_context). Move-only; thread-safe.
class Context {
public:
    /// Creates a context with `params` (defaults: the adapter chosen by EMBER_BACKEND /
    /// EMBER_ADAPTER or the first suitable one). Throws Error (EMBER_DEVICE_LOST when there is
    /// no GPU adapter; EMBER_UNSUPPORTED when the library's ABI differs from this header's).
    explicit Context(const ContextParams& params = ContextParams()) {
        if (!abi_compatible()) {
            throw Error(EMBER_UNSUPPORTED,
                        "ember.hpp: libember ABI " + std::to_string(ember_abi_version()) +
                            " differs from the header's " + std::to_string(EMBER_ABI_VERSION));
        }
        ember_context_params p = ember_context_default_params();
        p.backend = params.backend.empty() ? nullptr : params.backend.c_str();
        p.adapter = params.adapter.empty() ? nullptr : params.adapter.c_str();
        p.memory_budget = params.memory_budget;
        p.disable_f16 = params.disable_f16;
        p.disable_subgroups = params.disable_subgroups;
        detail::check(ember_context_create(&p, &handle_));
    }

    /// Takes ownership of a handle from ember_context_create (may be NULL).
    static Context adopt(ember_context* handle) noexcept { return Context(handle); }

    /// Not copyable: one owner per handle (move it instead).
    Context(const Context&) = delete;
    /// Not copyable: one owner per handle (move it instead).
    Context& operator=(const Context&) = delete;
    /// Takes over `other`'s handle; `other` is left empty.
    Context(Context&& other) noexcept : handle_(std::exchange(other.handle_, nullptr)) {}
    /// Frees this context's handle and takes over `other`'s.
    Context& operator=(Context&& other) noexcept {
        if (this != &other) {
            ember_context_free(handle_);
            handle_ = std::exchange(other.handle_, nullptr);
        }
        return *this;
    }
    /// Frees the handle (models and sessions made from it keep the device alive).
    ~Context() { ember_context_free(handle_); }

    /// A JSON description of the adapter (name, backend, driver, features, limits).
    std::string info_json() const {
        char* s = nullptr;
        detail::check(ember_context_info_json(handle_, &s));
        return detail::take_string(s);
    }

    /// The C handle (still owned by this object), for calls this wrapper lacks.
    ember_context* get() const noexcept { return handle_; }
    /// Gives up ownership: returns the handle (the caller frees it) and leaves this empty.
    ember_context* release() noexcept { return std::exchange(handle_, nullptr); }
    /// Whether this object holds a handle.
    explicit operator bool() const noexcept { return handle_ != nullptr; }

private:
    explicit Context(ember_context* handle) noexcept : handle_(handle) {}
    ember_context* handle_ = nullptr;
};

// ---------------------------------------------------------------------------------------
// Model
// ---------------------------------------------------------------------------------------

namespace detail {

struct ProgressState {
    const ProgressCallback* fn;
    std::exception_ptr error;
};

inline bool progress_trampoline(float progress, void* user_data) noexcept {
    auto* s = static_cast<ProgressState*>(user_data);
    try {
        return (*s->fn)(progress);
    } catch (...) {
        s->error = std::current_exception();
        return false;
    }
}

}  // namespace detail

/// A loaded model: weights on the device, tokenizer, configuration (ember_model). Move-only.
///
/// Thread safety: a Model is immutable, and every const method may be called from several
/// threads at once (as ember.h allows); many Sessions on many threads may share one Model by
/// const reference. Only moving, assigning or destroying the Model object itself must not
/// race with its use.
class Model {
public:
    /// Loads a GGUF file or an HF model directory onto `ctx`'s device. `progress` (optional)
    /// is called on this thread with the fraction done; returning false aborts (Error with
    /// EMBER_ABORTED); an exception it throws aborts the load and is rethrown from here.
    /// Throws Error: EMBER_IO (missing or unreadable file), EMBER_FORMAT (malformed file),
    /// EMBER_UNSUPPORTED, EMBER_OUT_OF_MEMORY, EMBER_INVALID_ARGUMENT (e.g. a NUL in `path`).
    Model(const Context& ctx, std::string_view path, const ProgressCallback& progress = {}) {
        const std::string p = detail::c_string(path, "path");
        ember_model_params params = ember_model_default_params();
        detail::ProgressState state{&progress, nullptr};
        if (progress) {
            params.progress = &detail::progress_trampoline;
            params.progress_user_data = &state;
        }
        const ember_status st = ember_model_load(ctx.get(), p.c_str(), &params, &handle_);
        if (state.error) {
            ember_model_free(handle_);  // NULL on failure; freed if the load still succeeded
            handle_ = nullptr;
            std::rethrow_exception(state.error);
        }
        detail::check(st);
    }

    /// Takes ownership of a handle from ember_model_load or ember_model_merge_adapters (may
    /// be NULL).
    static Model adopt(ember_model* handle) noexcept { return Model(handle); }

    /// Not copyable: one owner per handle (move it instead).
    Model(const Model&) = delete;
    /// Not copyable: one owner per handle (move it instead).
    Model& operator=(const Model&) = delete;
    /// Takes over `other`'s handle; `other` is left empty.
    Model(Model&& other) noexcept : handle_(std::exchange(other.handle_, nullptr)) {}
    /// Frees this model's handle and takes over `other`'s.
    Model& operator=(Model&& other) noexcept {
        if (this != &other) {
            ember_model_free(handle_);
            handle_ = std::exchange(other.handle_, nullptr);
        }
        return *this;
    }
    /// Frees the handle (sessions created from it keep working until they are freed).
    ~Model() { ember_model_free(handle_); }

    /// Sizes and special tokens of the model.
    ModelInfo info() const {
        ember_model_info c{};
        c.struct_size = sizeof(ember_model_info);
        detail::check(ember_model_get_info(handle_, &c));
        ModelInfo i;
        i.vocab = c.vocab;
        i.hidden = c.hidden;
        i.n_layers = c.n_layers;
        i.n_heads = c.n_heads;
        i.n_kv_heads = c.n_kv_heads;
        i.head_dim = c.head_dim;
        i.ff = c.ff;
        i.train_ctx = c.train_ctx;
        i.bos = c.bos;
        i.eos = c.eos;
        i.n_params = c.n_params;
        i.weight_bytes = c.weight_bytes;
        i.n_experts = c.n_experts;
        i.n_experts_used = c.n_experts_used;
        i.n_active_params = c.n_active_params;
        return i;
    }

    /// A JSON description of the model (config, source, weight formats).
    std::string info_json() const {
        char* s = nullptr;
        detail::check(ember_model_info_json(handle_, &s));
        return detail::take_string(s);
    }

    /// Token ids of UTF-8 `text`. `add_bos` adds the model's BOS if its tokenizer asks for
    /// one; `parse_special` turns special-token text such as "<|im_start|>" into its id.
    std::vector<uint32_t> tokenize(std::string_view text, bool add_bos = true,
                                   bool parse_special = false) const {
        const char* t = text.empty() ? "" : text.data();
        // Most text needs well under one token per 3 bytes; larger outputs take a second call.
        std::vector<uint32_t> ids(text.size() / 3 + 8);
        std::size_t n = 0;
        ember_status st = ember_tokenize(handle_, t, text.size(), add_bos, parse_special,
                                         ids.data(), ids.size(), &n);
        if (st == EMBER_BUFFER_TOO_SMALL) {
            ids.resize(n);
            st = ember_tokenize(handle_, t, text.size(), add_bos, parse_special, ids.data(),
                                ids.size(), &n);
        }
        detail::check(st);
        ids.resize(n);
        return ids;
    }

    /// UTF-8 text of `tokens`; `skip_special` leaves out control tokens. Throws Error with
    /// EMBER_INVALID_ARGUMENT for an id outside the vocabulary.
    std::string detokenize(span<const uint32_t> tokens, bool skip_special = false) const {
        const uint32_t* ids = detail::non_null(tokens.data());
        std::string out(tokens.size() * 4 + 16, '\0');
        std::size_t len = 0;
        ember_status st = ember_detokenize(handle_, ids, tokens.size(), skip_special, &out[0],
                                           out.size(), &len);
        if (st == EMBER_BUFFER_TOO_SMALL) {
            out.assign(len + 1, '\0');
            st = ember_detokenize(handle_, ids, tokens.size(), skip_special, &out[0],
                                  out.size(), &len);
        }
        detail::check(st);
        out.resize(len);
        return out;
    }

    /// UTF-8 text of `n` tokens at `tokens`.
    std::string detokenize(const uint32_t* tokens, std::size_t n,
                           bool skip_special = false) const {
        return detokenize(span<const uint32_t>(tokens, n), skip_special);
    }

    /// Whether `token` ends generation (EOS, end-of-turn). False on an empty Model.
    bool is_eog(uint32_t token) const noexcept { return ember_token_is_eog(handle_, token); }

    /// Renders `messages` with the model's chat template; `add_generation_prompt` appends the
    /// opening of the assistant's turn. Throws Error (e.g. EMBER_UNSUPPORTED or
    /// EMBER_FORMAT when the model has no usable template).
    std::string apply_chat_template(const std::vector<ChatMessage>& messages,
                                    bool add_generation_prompt = true) const {
        std::vector<std::string> owned;
        owned.reserve(messages.size() * 2);
        std::vector<ember_chat_message> c(messages.size());
        for (std::size_t i = 0; i < messages.size(); ++i) {
            owned.push_back(detail::c_string(messages[i].role, "chat message role"));
            owned.push_back(detail::c_string(messages[i].content, "chat message content"));
        }
        for (std::size_t i = 0; i < messages.size(); ++i) {
            c[i].role = owned[2 * i].c_str();
            c[i].content = owned[2 * i + 1].c_str();
        }
        char* s = nullptr;
        detail::check(ember_chat_template_apply(handle_, detail::non_null(c.data()), c.size(),
                                                add_generation_prompt, &s));
        return detail::take_string(s);
    }

    /// The C handle (still owned by this object), for calls this wrapper lacks.
    ember_model* get() const noexcept { return handle_; }
    /// Gives up ownership: returns the handle (the caller frees it) and leaves this empty.
    ember_model* release() noexcept { return std::exchange(handle_, nullptr); }
    /// Whether this object holds a handle.
    explicit operator bool() const noexcept { return handle_ != nullptr; }

private:
    explicit Model(ember_model* handle) noexcept : handle_(handle) {}
    ember_model* handle_ = nullptr;
};

// ---------------------------------------------------------------------------------------
// Adapter
// ---------------------------------------------------------------------------------------

/// A LoRA adapter in host memory (ember_adapter): immutable and thread-safe. Move-only.
/// Attaching it to a Session copies its weights to the device, so it may be destroyed
/// afterwards.
class Adapter {
public:
    /// Loads a PEFT adapter directory (adapter_config.json + adapter_model.safetensors) and
    /// checks it against `model` (shapes, targets, base identity when recorded). Throws Error:
    /// EMBER_IO, EMBER_FORMAT, EMBER_INVALID_ARGUMENT (made for another base, NUL in `dir`).
    Adapter(const Model& model, std::string_view dir) {
        const std::string d = detail::c_string(dir, "adapter directory");
        detail::check(ember_adapter_load(model.get(), d.c_str(), &handle_));
    }

    /// Takes ownership of a handle from ember_adapter_load, ember_adapter_combine or
    /// ember_trainer_get_adapter (may be NULL).
    static Adapter adopt(ember_adapter* handle) noexcept { return Adapter(handle); }

    /// Task arithmetic: one adapter applying sum_i weights[i] * adapters[i] (ranks
    /// concatenate, nothing is approximated). `weights` empty means all 1; otherwise it has
    /// one entry per adapter. The adapters must be made for the same base.
    static Adapter combine(const std::vector<const Adapter*>& adapters,
                           const std::vector<float>& weights = {}) {
        if (!weights.empty() && weights.size() != adapters.size()) {
            throw Error(EMBER_INVALID_ARGUMENT,
                        "ember.hpp: Adapter::combine needs one weight per adapter");
        }
        std::vector<const ember_adapter*> handles;
        handles.reserve(adapters.size());
        for (const Adapter* a : adapters) handles.push_back(a != nullptr ? a->get() : nullptr);
        ember_adapter* out = nullptr;
        detail::check(ember_adapter_combine(detail::non_null(handles.data()),
                                            weights.empty() ? nullptr : weights.data(),
                                            handles.size(), &out));
        return Adapter(out);
    }

    /// Not copyable: one owner per handle (move it instead).
    Adapter(const Adapter&) = delete;
    /// Not copyable: one owner per handle (move it instead).
    Adapter& operator=(const Adapter&) = delete;
    /// Takes over `other`'s handle; `other` is left empty.
    Adapter(Adapter&& other) noexcept : handle_(std::exchange(other.handle_, nullptr)) {}
    /// Frees this adapter's handle and takes over `other`'s.
    Adapter& operator=(Adapter&& other) noexcept {
        if (this != &other) {
            ember_adapter_free(handle_);
            handle_ = std::exchange(other.handle_, nullptr);
        }
        return *this;
    }
    /// Frees the handle (sessions it is attached to keep their copy).
    ~Adapter() { ember_adapter_free(handle_); }

    /// A JSON description: rank, alpha, rslora, targets, layers, parameter count, base.
    std::string info_json() const {
        char* s = nullptr;
        detail::check(ember_adapter_info_json(handle_, &s));
        return detail::take_string(s);
    }

    /// Saves the adapter to directory `dir` in the PEFT layout, recording `model`'s identity
    /// (each file written atomically).
    void save(const Model& model, std::string_view dir) const {
        const std::string d = detail::c_string(dir, "adapter directory");
        detail::check(ember_adapter_save(handle_, model.get(), d.c_str()));
    }

    /// The C handle (still owned by this object).
    ember_adapter* get() const noexcept { return handle_; }
    /// Gives up ownership: returns the handle (the caller frees it) and leaves this empty.
    ember_adapter* release() noexcept { return std::exchange(handle_, nullptr); }
    /// Whether this object holds a handle.
    explicit operator bool() const noexcept { return handle_ != nullptr; }

private:
    explicit Adapter(ember_adapter* handle) noexcept : handle_(handle) {}
    ember_adapter* handle_ = nullptr;
};

/// A new model with LoRA `adapters` (at strengths `weights`, empty = all 1; negative
/// subtracts) merged into `base`'s f32/f16 weights (ember_model_merge_adapters). `base` is
/// unchanged, so unmerging is exact: keep using it. Throws Error: EMBER_UNSUPPORTED for a
/// quantized base, EMBER_INVALID_ARGUMENT for adapters made for another base.
inline Model merge_adapters(const Model& base, const std::vector<const Adapter*>& adapters,
                            const std::vector<float>& weights = {}) {
    if (!weights.empty() && weights.size() != adapters.size()) {
        throw Error(EMBER_INVALID_ARGUMENT, "ember.hpp: merge_adapters needs one weight per adapter");
    }
    std::vector<const ember_adapter*> handles;
    handles.reserve(adapters.size());
    for (const Adapter* a : adapters) handles.push_back(a != nullptr ? a->get() : nullptr);
    ember_model* out = nullptr;
    detail::check(ember_model_merge_adapters(base.get(), detail::non_null(handles.data()),
                                             weights.empty() ? nullptr : weights.data(),
                                             handles.size(), &out));
    return Model::adopt(out);
}

// ---------------------------------------------------------------------------------------
// Session
// ---------------------------------------------------------------------------------------

namespace detail {

struct TokenState {
    const TokenCallback* fn;
    std::exception_ptr error;
};

inline bool token_trampoline(uint32_t token, const char* piece, std::size_t piece_len,
                             void* user_data) noexcept {
    auto* s = static_cast<TokenState*>(user_data);
    try {
        return (*s->fn)(token, piece != nullptr ? std::string_view(piece, piece_len)
                                                : std::string_view());
    } catch (...) {
        s->error = std::current_exception();
        return false;
    }
}

}  // namespace detail

/// A key/value cache with its sequences (ember_session). Move-only. Use one Session from
/// one thread at a time; different Sessions (also of one Model) run in parallel.
class Session {
public:
    /// Creates a session on `model` (which it keeps alive). Throws Error (e.g.
    /// EMBER_OUT_OF_MEMORY when the cache does not fit).
    explicit Session(const Model& model, const SessionParams& params = SessionParams()) {
        const ember_session_params p = params.to_c();
        detail::check(ember_session_create(model.get(), &p, &handle_));
    }

    /// Takes ownership of a handle from ember_session_create (may be NULL).
    static Session adopt(ember_session* handle) noexcept { return Session(handle); }

    /// Not copyable: one owner per handle (move it instead).
    Session(const Session&) = delete;
    /// Not copyable: one owner per handle (move it instead).
    Session& operator=(const Session&) = delete;
    /// Takes over `other`'s handle; `other` is left empty.
    Session(Session&& other) noexcept : handle_(std::exchange(other.handle_, nullptr)) {}
    /// Frees this session's handle and takes over `other`'s.
    Session& operator=(Session&& other) noexcept {
        if (this != &other) {
            ember_session_free(handle_);
            handle_ = std::exchange(other.handle_, nullptr);
        }
        return *this;
    }
    /// Frees the handle and its cache.
    ~Session() { ember_session_free(handle_); }

    /// Forgets every sequence (the cache is reused).
    void reset() { detail::check(ember_session_reset(handle_)); }

    /// Mixture-of-Experts loads: how many tokens each layer sent to each expert since the
    /// session began or reset_expert_counts(), layer-major (`counts[layer * n_experts +
    /// expert]`, n_experts from Model::info()). Empty for a dense model.
    std::vector<uint64_t> expert_counts() {
        size_t n = 0;
        ember_status st = ember_session_expert_counts(handle_, nullptr, 0, &n);
        std::vector<uint64_t> counts(n);
        if (st == EMBER_BUFFER_TOO_SMALL) {
            st = ember_session_expert_counts(handle_, counts.data(), counts.size(), &n);
        }
        detail::check(st);
        counts.resize(n);
        return counts;
    }

    /// Zeroes the counters of expert_counts().
    void reset_expert_counts() { detail::check(ember_session_reset_expert_counts(handle_)); }

    /// Generates a continuation of `prompt` in a fresh sequence (the session needs a free
    /// sequence slot). `on_token` (optional) streams each token on this thread; when it
    /// returns false the generation stops and the result says StopReason::Callback (no
    /// exception). An exception thrown by `on_token` stops the generation and is rethrown
    /// from here unchanged. Throws Error for a failed call, and EMBER_INVALID_ARGUMENT for a
    /// NUL byte in `prompt` or a stop string.
    Generation generate(std::string_view prompt, const GenerateParams& params = GenerateParams(),
                        const TokenCallback& on_token = {}) {
        const std::string p = detail::c_string(prompt, "prompt");
        std::vector<std::string> stop;
        stop.reserve(params.stop.size());
        for (const std::string& s : params.stop) stop.push_back(detail::c_string(s, "stop string"));
        std::vector<const char*> stop_ptrs;
        stop_ptrs.reserve(stop.size());
        for (const std::string& s : stop) stop_ptrs.push_back(s.c_str());

        ember_generate_params g = ember_generate_default_params();
        g.max_tokens = params.max_tokens;
        g.sampler = params.sampler.to_c();
        g.stop = stop_ptrs.empty() ? nullptr : stop_ptrs.data();
        g.n_stop = stop_ptrs.size();
        g.chat = params.chat;
        g.adapter = params.adapter;
        g.adapter_scale = params.adapter_scale;
        detail::TokenState state{&on_token, nullptr};
        if (on_token) {
            g.on_token = &detail::token_trampoline;
            g.user_data = &state;
        }

        ember_generate_result r{};
        r.struct_size = sizeof(ember_generate_result);
        char* text = nullptr;
        const ember_status st = ember_session_generate(handle_, p.c_str(), &g, &r, &text);
        std::string out = detail::take_string(text);  // freed even when throwing below
        if (state.error) std::rethrow_exception(state.error);
        const bool stopped_by_callback =
            st == EMBER_ABORTED && r.stop_reason == EMBER_STOP_CALLBACK;
        if (!stopped_by_callback) detail::check(st);

        Generation result;
        result.text = std::move(out);
        result.n_prompt_tokens = r.n_prompt_tokens;
        result.n_tokens = r.n_tokens;
        result.stop_reason = static_cast<StopReason>(r.stop_reason);
        result.prefill_tok_s = r.prefill_tok_s;
        result.decode_tok_s = r.decode_tok_s;
        return result;
    }

    /// Runs `tokens` through a fresh sequence and returns the logits of every position:
    /// tokens.size() * vocab floats, row-major (row i holds the logits after token i).
    std::vector<float> evaluate(span<const uint32_t> tokens) {
        const uint32_t* ids = detail::non_null(tokens.data());
        float probe = 0.0f;
        std::size_t need = 0;
        // A zero-capacity call only reports the size (EMBER_BUFFER_TOO_SMALL), computing nothing.
        ember_status st = ember_session_evaluate(handle_, ids, tokens.size(), &probe, 0, &need);
        if (st == EMBER_OK) return {};
        if (st != EMBER_BUFFER_TOO_SMALL) detail::check(st);
        std::vector<float> logits(need);
        detail::check(ember_session_evaluate(handle_, ids, tokens.size(), logits.data(),
                                             logits.size(), &need));
        logits.resize(need);
        return logits;
    }

    /// Logits of `n` tokens at `tokens` (see the span overload).
    std::vector<float> evaluate(const uint32_t* tokens, std::size_t n) {
        return evaluate(span<const uint32_t>(tokens, n));
    }

    /// Perplexity of UTF-8 `text` (tokenized without BOS) over consecutive windows of
    /// `window` tokens (at most the session's context), llama.cpp's definition.
    Perplexity perplexity(std::string_view text, uint32_t window) {
        const std::string t = detail::c_string(text, "text");
        Perplexity p;
        detail::check(ember_session_perplexity(handle_, t.c_str(), window, &p.ppl, &p.scored));
        return p;
    }

    /// Adds a sequence that samples with `sampler`; returns its id.
    uint64_t add_sequence(const SamplerParams& sampler = SamplerParams()) {
        const ember_sampler_params s = sampler.to_c();
        uint64_t id = 0;
        detail::check(ember_seq_add(handle_, &s, &id));
        return id;
    }

    /// Removes sequence `seq`, freeing its cache region.
    void remove_sequence(uint64_t seq) { detail::check(ember_seq_remove(handle_, seq)); }

    /// Feeds prompt `tokens` to sequence `seq`; returns the token it samples next.
    uint32_t prefill(uint64_t seq, span<const uint32_t> tokens) {
        uint32_t next = 0;
        detail::check(ember_seq_prefill(handle_, seq, detail::non_null(tokens.data()),
                                        tokens.size(), &next));
        return next;
    }

    /// Feeds `n` prompt tokens at `tokens` to sequence `seq` (see the span overload).
    uint32_t prefill(uint64_t seq, const uint32_t* tokens, std::size_t n) {
        return prefill(seq, span<const uint32_t>(tokens, n));
    }

    /// One batched decode step: each sequence in `seqs` feeds the token it last sampled and
    /// samples the next; returns those, in the order of `seqs`.
    std::vector<uint32_t> decode(span<const uint64_t> seqs) {
        std::vector<uint32_t> next(seqs.size());
        uint32_t none = 0;  // a valid pointer for an empty step
        detail::check(ember_seq_decode(handle_, detail::non_null(seqs.data()), seqs.size(),
                                       next.empty() ? &none : next.data()));
        return next;
    }

    /// One batched decode step over `n` sequences at `seqs`, writing their next tokens to
    /// `next` (room for `n`).
    void decode(const uint64_t* seqs, std::size_t n, uint32_t* next) {
        detail::check(ember_seq_decode(handle_, seqs, n, next));
    }

    /// Attaches `adapter` (a copy of its weights goes to the device) under `name` (for logs;
    /// may be empty) and returns its id in this session, for GenerateParams::adapter or
    /// set_sequence_adapter. Throws Error when it was made for another base model.
    int32_t attach_adapter(const Adapter& adapter, std::string_view name = {}) {
        const std::string n = detail::c_string(name, "adapter name");
        int32_t id = -1;
        detail::check(ember_session_attach_adapter(handle_, adapter.get(),
                                                   n.empty() ? nullptr : n.c_str(), &id));
        return id;
    }

    /// Detaches adapter `id`; sequences that used it continue with the base model.
    void detach_adapter(int32_t id) { detail::check(ember_session_detach_adapter(handle_, id)); }

    /// Hot-swaps the weights of attached adapter `id` for `adapter`'s (between requests; on
    /// failure the old adapter stays attached).
    void replace_adapter(int32_t id, const Adapter& adapter) {
        detail::check(ember_session_replace_adapter(handle_, id, adapter.get()));
    }

    /// Sets attached adapter `id`'s strength (1 = as trained, 0 = off, negative subtracts it).
    void set_adapter_scale(int32_t id, float scale) {
        detail::check(ember_session_set_adapter_scale(handle_, id, scale));
    }

    /// Chooses the adapter of sequence `seq` (an attached id, or -1 for the base model) and
    /// its strength, for the tokens it processes from now on.
    void set_sequence_adapter(uint64_t seq, int32_t id, float scale = 1.0f) {
        detail::check(ember_seq_set_adapter(handle_, seq, id, scale));
    }

    /// The C handle (still owned by this object), for calls this wrapper lacks.
    ember_session* get() const noexcept { return handle_; }
    /// Gives up ownership: returns the handle (the caller frees it) and leaves this empty.
    ember_session* release() noexcept { return std::exchange(handle_, nullptr); }
    /// Whether this object holds a handle.
    explicit operator bool() const noexcept { return handle_ != nullptr; }

private:
    explicit Session(ember_session* handle) noexcept : handle_(handle) {}
    ember_session* handle_ = nullptr;
};

// ---------------------------------------------------------------------------------------
// Training
// ---------------------------------------------------------------------------------------

/// Learning-rate schedules (the values of ember_lr_schedule).
enum class LrSchedule : int {
    /// The base rate throughout.
    Constant = EMBER_LR_CONSTANT,
    /// Linear warmup, then cosine decay to 0 at total_steps.
    Cosine = EMBER_LR_COSINE,
    /// Linear warmup, then constant (continual training).
    WarmupConstant = EMBER_LR_WARMUP_CONSTANT,
};

/// What a Trainer trains and how; the defaults are ember_train_default_params()'s (LoRA rank
/// 8 on every projection, 256-token sequences, AdamW at 1e-3 clipped at 1, cosine schedule
/// over 100 steps with 5 warmup steps).
struct TrainParams {
    /// LoRA rank (0: no LoRA).
    uint32_t lora_rank;
    /// LoRA alpha (0: twice the rank).
    float lora_alpha;
    /// Scale by alpha / sqrt(rank) instead of alpha / rank.
    bool rslora;
    /// EMBER_TARGET_* bits, e.g. EMBER_TARGET_Q | EMBER_TARGET_V (0: all seven projections).
    uint32_t lora_targets;
    /// Train a soft prompt of this many virtual tokens (0: none).
    uint32_t prompt_tokens;
    /// Train a prefix of this many virtual tokens (0: none; not with a soft prompt).
    uint32_t prefix_tokens;
    /// Continue training this LoRA adapter instead of a fresh one (nullptr: fresh). Only read
    /// by the Trainer constructor (the trainer copies it).
    const Adapter* init_adapter = nullptr;
    /// Longest sequence in tokens, virtual tokens included (a multiple of 32).
    uint32_t seq_len;
    /// Base learning rate.
    float lr;
    /// AdamW weight decay.
    float weight_decay;
    /// Clip gradients to this global norm (0: off).
    float max_grad_norm;
    /// AdamW beta1.
    float beta1;
    /// AdamW beta2.
    float beta2;
    /// AdamW epsilon.
    float eps;
    /// Learning-rate schedule.
    LrSchedule schedule;
    /// Warmup steps.
    uint32_t warmup_steps;
    /// Steps of the whole run (for the cosine schedule).
    uint32_t total_steps;
    /// Seed of the initialization and of the shuffling of Trainer::train_file.
    uint64_t seed;
    /// Weight of a distilled token's term: records with "distill": true learn the frozen
    /// base model's next-token distribution (KL divergence) instead of their own tokens.
    float distill_weight;
    /// Train a mixture of this many LoRA experts (2..32, each of lora_rank) behind a
    /// trainable router on every adapted projection instead of one LoRA pair (0: plain).
    uint32_t lora_experts;
    /// Experts each token uses in a mixture.
    uint32_t lora_top_k;
    /// Keep the chosen experts' softmax-over-all gates (Switch, for top-1) instead of
    /// renormalizing them to sum to 1.
    bool switch_gates;
    /// Weight alpha of a mixture's load-balancing loss (alpha * E * sum_e f_e P_e).
    float balance_loss;
    /// Weight of a mixture's router z-loss (mean squared log-sum-exp of router logits).
    float z_loss;

    /// The library's defaults.
    TrainParams() {
        const ember_train_params d = ember_train_default_params();
        lora_rank = d.lora_rank;
        lora_alpha = d.lora_alpha;
        rslora = d.rslora;
        lora_targets = d.lora_targets;
        prompt_tokens = d.prompt_tokens;
        prefix_tokens = d.prefix_tokens;
        seq_len = d.seq_len;
        lr = d.lr;
        weight_decay = d.weight_decay;
        max_grad_norm = d.max_grad_norm;
        beta1 = d.beta1;
        beta2 = d.beta2;
        eps = d.eps;
        schedule = static_cast<LrSchedule>(d.schedule);
        warmup_steps = d.warmup_steps;
        total_steps = d.total_steps;
        seed = d.seed;
        distill_weight = d.distill_weight;
        lora_experts = d.lora_experts;
        lora_top_k = d.lora_top_k;
        switch_gates = d.switch_gates;
        balance_loss = d.balance_loss;
        z_loss = d.z_loss;
    }

    /// The C struct (struct_size set; init_adapter borrowed from `init_adapter`).
    ember_train_params to_c() const {
        ember_train_params p = ember_train_default_params();
        p.lora_rank = lora_rank;
        p.lora_alpha = lora_alpha;
        p.rslora = rslora;
        p.lora_targets = lora_targets;
        p.prompt_tokens = prompt_tokens;
        p.prefix_tokens = prefix_tokens;
        p.init_adapter = init_adapter != nullptr ? init_adapter->get() : nullptr;
        p.seq_len = seq_len;
        p.lr = lr;
        p.weight_decay = weight_decay;
        p.max_grad_norm = max_grad_norm;
        p.beta1 = beta1;
        p.beta2 = beta2;
        p.eps = eps;
        p.schedule = static_cast<ember_lr_schedule>(schedule);
        p.warmup_steps = warmup_steps;
        p.total_steps = total_steps;
        p.seed = seed;
        p.distill_weight = distill_weight;
        p.lora_experts = lora_experts;
        p.lora_top_k = lora_top_k;
        p.switch_gates = switch_gates;
        p.balance_loss = balance_loss;
        p.z_loss = z_loss;
        return p;
    }
};

/// What one optimizer step did (ember_step_result).
struct StepResult {
    /// Updates the trainer has applied so far (skipped steps not counted).
    uint32_t step = 0;
    /// Mean loss over the scored tokens, before the update.
    double loss = 0.0;
    /// Global gradient norm, before clipping.
    float grad_norm = 0.0f;
    /// Learning rate used.
    float lr = 0.0f;
    /// Tokens scored.
    uint64_t tokens = 0;
    /// The loss or a gradient was not finite: the update was skipped, nothing changed.
    bool skipped = false;
    /// Seconds the step took.
    double seconds = 0.0;
    /// A mixture of LoRA experts' auxiliary losses (load balancing and z-loss), trained
    /// beside `loss`; 0 otherwise.
    double aux_loss = 0.0;

    /// The values of a C struct.
    static StepResult from_c(const ember_step_result& r) {
        StepResult s;
        s.step = r.step;
        s.loss = r.loss;
        s.grad_norm = r.grad_norm;
        s.lr = r.lr;
        s.tokens = r.tokens;
        s.skipped = r.skipped;
        s.seconds = r.seconds;
        s.aux_loss = r.aux_loss;
        return s;
    }
};

/// Progress of Trainer::train_file, called after every step with the steps done in this
/// call (1..total) and the step's result. Return false to stop (train_file then throws Error
/// with EMBER_ABORTED; the steps done are kept).
using TrainCallback = std::function<bool(uint32_t step, uint32_t total, const StepResult&)>;

namespace detail {

/// `s` as a JSON string literal (quotes included; control characters escaped). The bytes
/// are passed through otherwise, so `s` must be UTF-8 (the library checks).
inline std::string json_string(std::string_view s) {
    static const char hex[] = "0123456789abcdef";
    std::string out;
    out.reserve(s.size() + 2);
    out += '"';
    for (const char c : s) {
        const auto u = static_cast<unsigned char>(c);
        switch (c) {
            case '"': out += "\\\""; break;
            case '\\': out += "\\\\"; break;
            case '\n': out += "\\n"; break;
            case '\r': out += "\\r"; break;
            case '\t': out += "\\t"; break;
            default:
                if (u < 0x20) {
                    out += "\\u00";
                    out += hex[u >> 4];
                    out += hex[u & 15];
                } else {
                    out += c;
                }
        }
    }
    out += '"';
    return out;
}

struct TrainState {
    const TrainCallback* fn;
    std::exception_ptr error;
};

inline bool train_trampoline(uint32_t step, uint32_t total, const ember_step_result* result,
                             void* user_data) noexcept {
    auto* s = static_cast<TrainState*>(user_data);
    try {
        const StepResult r = result != nullptr ? StepResult::from_c(*result) : StepResult();
        return (*s->fn)(step, total, r);
    } catch (...) {
        s->error = std::current_exception();
        return false;
    }
}

}  // namespace detail

/// Training records as JSON lines for Trainer::step and Trainer::evaluate (join several with
/// jsonl()).
namespace record {

/// {"text": ...}: every token is scored.
inline std::string text(std::string_view text) {
    return "{\"text\":" + detail::json_string(text) + "}";
}

/// {"prompt": ..., "completion": ...}: the completion and an end-of-sequence token are
/// scored.
inline std::string prompt_completion(std::string_view prompt, std::string_view completion) {
    return "{\"prompt\":" + detail::json_string(prompt) +
           ",\"completion\":" + detail::json_string(completion) + "}";
}

/// {"messages": [...]}: rendered with the model's chat template; the assistant turns are
/// scored.
inline std::string chat(const std::vector<ChatMessage>& messages) {
    std::string out = "{\"messages\":[";
    for (std::size_t i = 0; i < messages.size(); ++i) {
        if (i > 0) out += ',';
        out += "{\"role\":" + detail::json_string(messages[i].role) +
               ",\"content\":" + detail::json_string(messages[i].content) + "}";
    }
    return out + "]}";
}

}  // namespace record

/// Records (one JSON object each, e.g. from ember::record) joined into JSONL text.
inline std::string jsonl(const std::vector<std::string>& records) {
    std::string out;
    for (const std::string& r : records) {
        out += r;
        out += '\n';
    }
    return out;
}

/// Trains an adapter of a model on its GPU (ember_trainer): a LoRA adapter, a soft prompt or
/// a prefix; the model's weights stay frozen. Move-only. Use one Trainer from one thread at
/// a time; the model may serve Sessions meanwhile.
class Trainer {
public:
    /// Prepares training on `model` (which it keeps alive). Throws Error:
    /// EMBER_INVALID_ARGUMENT when nothing is to be trained, seq_len is not a multiple of 32,
    /// a rate is negative or init_adapter belongs to another base; EMBER_OUT_OF_MEMORY.
    explicit Trainer(const Model& model, const TrainParams& params = TrainParams()) {
        const ember_train_params p = params.to_c();
        detail::check(ember_trainer_create(model.get(), &p, &handle_));
    }

    /// Takes ownership of a handle from ember_trainer_create (may be NULL).
    static Trainer adopt(ember_trainer* handle) noexcept { return Trainer(handle); }

    /// Not copyable: one owner per handle (move it instead).
    Trainer(const Trainer&) = delete;
    /// Not copyable: one owner per handle (move it instead).
    Trainer& operator=(const Trainer&) = delete;
    /// Takes over `other`'s handle; `other` is left empty.
    Trainer(Trainer&& other) noexcept : handle_(std::exchange(other.handle_, nullptr)) {}
    /// Frees this trainer's handle and takes over `other`'s.
    Trainer& operator=(Trainer&& other) noexcept {
        if (this != &other) {
            ember_trainer_free(handle_);
            handle_ = std::exchange(other.handle_, nullptr);
        }
        return *this;
    }
    /// Frees the handle and its device buffers.
    ~Trainer() { ember_trainer_free(handle_); }

    /// One optimizer step on the JSONL records in `jsonl` (see ember::record and
    /// ember::jsonl); all records form one batch. Throws Error (EMBER_INVALID_ARGUMENT for a
    /// malformed record, naming its line).
    StepResult step(std::string_view jsonl) {
        const std::string j = detail::c_string(jsonl, "JSONL");
        ember_step_result r{};
        r.struct_size = sizeof(ember_step_result);
        detail::check(ember_trainer_step(handle_, j.c_str(), &r));
        return StepResult::from_c(r);
    }

    /// One optimizer step on token sequences (one batch). `loss_masks` is empty (every token
    /// scored) or holds one entry per sequence, as long as it, nonzero where the token is
    /// scored. Throws Error (EMBER_INVALID_ARGUMENT for an id outside the vocabulary or
    /// masks that do not match).
    StepResult step_tokens(const std::vector<std::vector<uint32_t>>& sequences,
                           const std::vector<std::vector<uint8_t>>& loss_masks = {}) {
        if (!loss_masks.empty() && loss_masks.size() != sequences.size()) {
            throw Error(EMBER_INVALID_ARGUMENT,
                        "ember.hpp: Trainer::step_tokens needs one loss mask per sequence");
        }
        std::vector<uint32_t> tokens;
        std::vector<uint8_t> mask;
        std::vector<std::size_t> lengths;
        lengths.reserve(sequences.size());
        for (std::size_t i = 0; i < sequences.size(); ++i) {
            const std::vector<uint32_t>& s = sequences[i];
            tokens.insert(tokens.end(), s.begin(), s.end());
            lengths.push_back(s.size());
            if (!loss_masks.empty()) {
                if (loss_masks[i].size() != s.size()) {
                    throw Error(EMBER_INVALID_ARGUMENT,
                                "ember.hpp: loss mask " + std::to_string(i) + " has " +
                                    std::to_string(loss_masks[i].size()) + " entries for " +
                                    std::to_string(s.size()) + " tokens");
                }
                mask.insert(mask.end(), loss_masks[i].begin(), loss_masks[i].end());
            }
        }
        return step_tokens(tokens, loss_masks.empty() ? span<const uint8_t>() : mask, lengths);
    }

    /// One optimizer step on sequences concatenated in `tokens`, their lengths in `lengths`;
    /// `loss_mask` is empty (every token scored) or one byte per token.
    StepResult step_tokens(span<const uint32_t> tokens, span<const uint8_t> loss_mask,
                           span<const std::size_t> lengths) {
        if (!loss_mask.empty() && loss_mask.size() != tokens.size()) {
            throw Error(EMBER_INVALID_ARGUMENT,
                        "ember.hpp: the loss mask needs one byte per token");
        }
        ember_step_result r{};
        r.struct_size = sizeof(ember_step_result);
        detail::check(ember_trainer_step_tokens(
            handle_, detail::non_null(tokens.data()),
            loss_mask.empty() ? nullptr : loss_mask.data(), detail::non_null(lengths.data()),
            lengths.size(), &r));
        return StepResult::from_c(r);
    }

    /// Trains `steps` optimizer steps on the file at `path` (JSONL records or plain text) in
    /// batches of `batch_size` sequences, reshuffled every epoch; returns the last step's
    /// loss. `callback` (optional) runs on this thread after every step: returning false
    /// stops training (Error with EMBER_ABORTED; the steps done are kept), and an exception
    /// it throws stops training and is rethrown from here unchanged.
    double train_file(std::string_view path, uint32_t steps, uint32_t batch_size,
                      const TrainCallback& callback = {}) {
        const std::string p = detail::c_string(path, "path");
        detail::TrainState state{&callback, nullptr};
        double loss = 0.0;
        const ember_status st = ember_trainer_train_file(
            handle_, p.c_str(), steps, batch_size,
            callback ? &detail::train_trampoline : nullptr, callback ? &state : nullptr, &loss);
        if (state.error) std::rethrow_exception(state.error);
        detail::check(st);
        return loss;
    }

    /// Mean loss of the JSONL records in `jsonl` with the current parameters (no update).
    double evaluate(std::string_view jsonl) {
        const std::string j = detail::c_string(jsonl, "JSONL");
        double loss = 0.0;
        detail::check(ember_trainer_evaluate(handle_, j.c_str(), &loss));
        return loss;
    }

    /// A snapshot of the trained LoRA adapter: attach it to Sessions (or hot-swap it in with
    /// Session::replace_adapter) while training goes on. Throws Error with EMBER_UNSUPPORTED
    /// when the trainer trains no LoRA.
    Adapter adapter() {
        ember_adapter* a = nullptr;
        detail::check(ember_trainer_get_adapter(handle_, &a));
        return Adapter::adopt(a);
    }

    /// Saves what is trained to directory `dir` in the PEFT layout, every file atomically:
    /// one trained part goes to `dir` itself; a LoRA together with a soft prompt or prefix
    /// goes to dir/lora and dir/prompt or dir/prefix.
    void save(std::string_view dir) {
        const std::string d = detail::c_string(dir, "directory");
        detail::check(ember_trainer_save(handle_, d.c_str()));
    }

    /// A JSON description (trainable parameters, steps, settings, device memory).
    std::string info_json() const {
        char* s = nullptr;
        detail::check(ember_trainer_info_json(handle_, &s));
        return detail::take_string(s);
    }

    /// The C handle (still owned by this object).
    ember_trainer* get() const noexcept { return handle_; }
    /// Gives up ownership: returns the handle (the caller frees it) and leaves this empty.
    ember_trainer* release() noexcept { return std::exchange(handle_, nullptr); }
    /// Whether this object holds a handle.
    explicit operator bool() const noexcept { return handle_ != nullptr; }

private:
    explicit Trainer(ember_trainer* handle) noexcept : handle_(handle) {}
    ember_trainer* handle_ = nullptr;
};

}  // namespace ember

#endif  // EMBER_HPP
