// Streams a generation with the C++ wrapper (bindings/cpp/ember.hpp) and prints its stats.
//
//     generate MODEL [PROMPT] [-n MAX_TOKENS] [--temp T] [--seed S] [--chat]
//
// MODEL is a GGUF file or an HF model directory. The text goes to stdout as it is generated;
// the load progress and the statistics go to stderr. Build (see bindings/cpp/README.md):
//
//     c++ -std=c++17 -I capi/include -I bindings/cpp examples/cpp/generate.cpp
//         -L target/release -lember -Wl,-rpath,"$PWD/target/release" -o generate
#include <ember.hpp>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>

namespace {

int usage(const char* argv0) {
    std::fprintf(stderr,
                 "usage: %s MODEL [PROMPT] [-n MAX_TOKENS] [--temp T] [--seed S] [--chat]\n",
                 argv0);
    return 2;
}

}  // namespace

int main(int argc, char** argv) {
    if (argc < 2) return usage(argv[0]);
    std::string model_path;
    std::string prompt = "The capital of France is";
    ember::GenerateParams params;
    params.max_tokens = 32;
    params.sampler = ember::SamplerParams::greedy();
    int positional = 0;
    for (int i = 1; i < argc; ++i) {
        const std::string a = argv[i];
        const bool has_value = i + 1 < argc;
        if (a == "-n" && has_value) {
            params.max_tokens = static_cast<uint32_t>(std::strtoul(argv[++i], nullptr, 10));
        } else if (a == "--temp" && has_value) {
            params.sampler = ember::SamplerParams();
            params.sampler.temperature = std::strtof(argv[++i], nullptr);
        } else if (a == "--seed" && has_value) {
            params.sampler.seed = std::strtoull(argv[++i], nullptr, 10);
        } else if (a == "--chat") {
            params.chat = true;
        } else if (!a.empty() && a[0] == '-') {
            return usage(argv[0]);
        } else if (positional == 0) {
            model_path = a;
            ++positional;
        } else if (positional == 1) {
            prompt = a;
            ++positional;
        } else {
            return usage(argv[0]);
        }
    }
    if (model_path.empty()) return usage(argv[0]);

    try {
        ember::Context ctx;
        ember::Model model(ctx, model_path, [](float done) {
            std::fprintf(stderr, "\rloading %3.0f%%", 100.0 * static_cast<double>(done));
            return true;
        });
        std::fprintf(stderr, "\rloaded %s\n", model_path.c_str());
        const ember::ModelInfo info = model.info();

        ember::Session session(model);
        if (!params.chat) std::fputs(prompt.c_str(), stdout);
        const ember::Generation g =
            session.generate(prompt, params, [](uint32_t, std::string_view piece) {
                std::fwrite(piece.data(), 1, piece.size(), stdout);
                std::fflush(stdout);
                return true;
            });
        std::fputc('\n', stdout);

        std::fprintf(stderr,
                     "model: %u layers, hidden %u, vocab %u, %llu parameters\n"
                     "prompt: %u tokens, %.1f tok/s\n"
                     "generated: %u tokens, %.1f tok/s, stopped by %s\n",
                     info.n_layers, info.hidden, info.vocab,
                     static_cast<unsigned long long>(info.n_params), g.n_prompt_tokens,
                     g.prefill_tok_s, g.n_tokens, g.decode_tok_s, ember::to_string(g.stop_reason));
        return 0;
    } catch (const ember::Error& e) {
        std::fprintf(stderr, "\nerror (%s): %s\n", e.status_name(), e.message().c_str());
        return 1;
    }
}
