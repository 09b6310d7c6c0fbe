/* Streams a generation through the C ABI (capi/include/ember.h) and prints its statistics.
 *
 *     generate MODEL [PROMPT] [-n MAX_TOKENS] [--temp T] [--seed S] [--chat] [--stop-after K]
 *
 * MODEL is a GGUF file or an HF model directory. The text goes to stdout as it is generated;
 * the load progress and the statistics go to stderr. `--stop-after K` makes the token
 * callback return false after K tokens: the generation then ends with EMBER_ABORTED, which
 * this program expects and reports. Build (see scripts/test-c.sh):
 *
 *     cc -std=c11 -I capi/include examples/c/generate.c -L target/release -lember
 *        -Wl,-rpath,"$PWD/target/release" -o generate
 */
#include <ember.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* What the token callback needs: how many tokens it has seen and when to stop. */
typedef struct stream_state {
    unsigned n_tokens;
    unsigned stop_after; /* 0: never */
} stream_state;

static bool on_progress(float done, void *user_data) {
    (void)user_data;
    fprintf(stderr, "\rloading %3.0f%%", 100.0 * (double)done);
    return true;
}

static bool on_token(uint32_t token, const char *piece, size_t piece_len, void *user_data) {
    stream_state *st = user_data;
    (void)token;
    fwrite(piece, 1, piece_len, stdout);
    fflush(stdout);
    st->n_tokens++;
    return st->stop_after == 0 || st->n_tokens < st->stop_after;
}

static const char *stop_reason_str(ember_stop_reason r) {
    switch (r) {
    case EMBER_STOP_EOS: return "eos";
    case EMBER_STOP_LENGTH: return "length";
    case EMBER_STOP_STRING: return "stop string";
    case EMBER_STOP_CONTEXT: return "context full";
    case EMBER_STOP_CALLBACK: return "callback";
    }
    return "?";
}

/* Prints a failed call's status and message; returns 1 for `return fail(...)`. */
static int fail(const char *what, ember_status st) {
    fprintf(stderr, "generate: %s failed: %s: %s\n", what, ember_status_str(st),
            ember_last_error());
    return 1;
}

static int usage(const char *argv0) {
    fprintf(stderr,
            "usage: %s MODEL [PROMPT] [-n MAX_TOKENS] [--temp T] [--seed S] [--chat] "
            "[--stop-after K]\n",
            argv0);
    return 2;
}

int main(int argc, char **argv) {
    const char *model_path = NULL;
    const char *prompt = "The capital of France is";
    ember_generate_params gp = ember_generate_default_params();
    gp.max_tokens = 32;
    gp.sampler.temperature = 0.0f; /* greedy unless --temp */
    stream_state stream = {0, 0};
    int positional = 0;
    for (int i = 1; i < argc; ++i) {
        const char *a = argv[i];
        const int has_value = i + 1 < argc;
        if (strcmp(a, "-n") == 0 && has_value) {
            gp.max_tokens = (uint32_t)strtoul(argv[++i], NULL, 10);
        } else if (strcmp(a, "--temp") == 0 && has_value) {
            gp.sampler.temperature = strtof(argv[++i], NULL);
        } else if (strcmp(a, "--seed") == 0 && has_value) {
            gp.sampler.seed = strtoull(argv[++i], NULL, 10);
        } else if (strcmp(a, "--stop-after") == 0 && has_value) {
            stream.stop_after = (unsigned)strtoul(argv[++i], NULL, 10);
        } else if (strcmp(a, "--chat") == 0) {
            gp.chat = true;
        } else if (a[0] == '-') {
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
    if (model_path == NULL) return usage(argv[0]);
    if (!EMBER_CHECK_ABI()) {
        fprintf(stderr, "generate: libember ABI %u, header %d\n", ember_abi_version(),
                EMBER_ABI_VERSION);
        return 1;
    }

    int rc = 1;
    ember_context *ctx = NULL;
    ember_model *model = NULL;
    ember_session *session = NULL;
    char *text = NULL;
    ember_status st;

    if ((st = ember_context_create(NULL, &ctx)) != EMBER_OK) {
        rc = fail("ember_context_create", st);
        goto done;
    }
    ember_model_params mp = ember_model_default_params();
    mp.progress = on_progress;
    if ((st = ember_model_load(ctx, model_path, &mp, &model)) != EMBER_OK) {
        fputc('\n', stderr);
        rc = fail("ember_model_load", st);
        goto done;
    }
    fprintf(stderr, "\rloaded %s\n", model_path);
    ember_model_info info = {.struct_size = sizeof info};
    if ((st = ember_model_get_info(model, &info)) != EMBER_OK) {
        rc = fail("ember_model_get_info", st);
        goto done;
    }

    ember_session_params sp = ember_session_default_params();
    sp.n_ctx = 512;
    if ((st = ember_session_create(model, &sp, &session)) != EMBER_OK) {
        rc = fail("ember_session_create", st);
        goto done;
    }

    gp.on_token = on_token;
    gp.user_data = &stream;
    ember_generate_result res = {.struct_size = sizeof res};
    if (!gp.chat) fputs(prompt, stdout);
    st = ember_session_generate(session, prompt, &gp, &res, &text);
    fputc('\n', stdout);
    if (st == EMBER_ABORTED && stream.stop_after > 0) {
        /* We asked for it: the result and the text are filled all the same. */
        if (res.stop_reason != EMBER_STOP_CALLBACK || res.n_tokens != stream.stop_after ||
            text == NULL) {
            fprintf(stderr, "generate: the abort did not report itself (%s, %u tokens)\n",
                    stop_reason_str(res.stop_reason), res.n_tokens);
            goto done;
        }
        fprintf(stderr, "stopped by the callback after %u tokens, as asked (%s)\n",
                res.n_tokens, ember_last_error());
    } else if (st != EMBER_OK) {
        rc = fail("ember_session_generate", st);
        goto done;
    }
    fprintf(stderr,
            "%u layers, hidden %u, vocab %u: %u prompt tokens (%.1f tok/s), %u generated "
            "(%.1f tok/s), stop: %s\n",
            info.n_layers, info.hidden, info.vocab, res.n_prompt_tokens, res.prefill_tok_s,
            res.n_tokens, res.decode_tok_s, stop_reason_str(res.stop_reason));
    rc = 0;

done:
    ember_string_free(text);
    ember_session_free(session);
    ember_model_free(model);
    ember_context_free(ctx);
    return rc;
}
