/* Exercises the error handling of the C ABI: NULL pointers, missing and malformed files,
 * wrong struct_size, callbacks that stop the work, buffers that are too small. Every failing
 * call must return the documented status, leave its outputs NULL and explain itself in
 * ember_last_error(); every successful call clears the message.
 *
 *     errors MODEL WORKDIR
 *
 * MODEL is a small model (the tests use the tiny random one); WORKDIR a writable directory
 * for the malformed files. Prints one line per check; exits 1 if any expectation fails.
 */
#include <ember.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int n_checks, n_failures;

/* Checks that `st` is `want` and, for a failure, that the thread's message is there and
 * contains `fragment` (when not NULL). */
static void check_status(int line, const char *call, ember_status st, ember_status want,
                         const char *fragment) {
    const char *msg = ember_last_error();
    int ok = st == want;
    if (want == EMBER_OK)
        ok = ok && msg[0] == '\0';
    else
        ok = ok && msg[0] != '\0' && (fragment == NULL || strstr(msg, fragment) != NULL);
    ++n_checks;
    if (!ok) {
        ++n_failures;
        fprintf(stderr, "FAIL errors.c:%d: %s gave %s (\"%s\"), expected %s%s%s\n", line, call,
                ember_status_str(st), msg, ember_status_str(want),
                fragment ? " mentioning " : "", fragment ? fragment : "");
    } else {
        printf("ok   %-58s %s%s%s\n", call, ember_status_str(st), msg[0] ? ": " : "", msg);
    }
}

#define EXPECT_STATUS(call, want, fragment) \
    check_status(__LINE__, #call, (call), (want), (fragment))

#define EXPECT(cond)                                                                     \
    do {                                                                                 \
        ++n_checks;                                                                      \
        if (!(cond)) {                                                                   \
            ++n_failures;                                                                \
            fprintf(stderr, "FAIL errors.c:%d: expected %s\n", __LINE__, #cond);         \
        }                                                                                \
    } while (0)

/* A non-NULL pointer that a failing call must overwrite with NULL. */
#define POISON(T) ((T *)(void *)&n_checks)

/* Checks that a failing call set handle `p` to NULL (and makes sure it is NULL after). */
#define EXPECT_NULL(p)   \
    do {                 \
        EXPECT(p == NULL); \
        p = NULL;        \
    } while (0)

static int write_file(const char *path, const char *bytes, size_t n) {
    FILE *f = fopen(path, "wb");
    if (f == NULL) return -1;
    int rc = fwrite(bytes, 1, n, f) == n ? 0 : -1;
    return fclose(f) == 0 ? rc : -1;
}

static bool abort_load(float progress, void *user_data) {
    (void)progress;
    ++*(int *)user_data;
    return false;
}

static bool stop_after_two(uint32_t token, const char *piece, size_t len, void *user_data) {
    (void)token;
    (void)piece;
    (void)len;
    return ++*(int *)user_data < 2;
}

static bool stop_training(uint32_t step, uint32_t total, const ember_step_result *r,
                          void *user_data) {
    (void)total;
    (void)r;
    *(uint32_t *)user_data = step;
    return false;
}

static void count_logs(ember_log_level level, const char *message, void *user_data) {
    (void)level;
    if (message != NULL) ++*(int *)user_data;
}

int main(int argc, char **argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: %s MODEL WORKDIR\n", argv[0]);
        return 2;
    }
    const char *model_path = argv[1], *work = argv[2];
    char path[4096];

    ember_context *ctx = NULL;
    ember_model *model = NULL;
    ember_session *session = NULL;
    ember_trainer *trainer = NULL;
    ember_adapter *adapter = NULL;
    char *text = NULL;

    /* Status names and version. */
    static const char *const names[] = {
        "EMBER_OK",          "EMBER_INVALID_ARGUMENT", "EMBER_IO",
        "EMBER_FORMAT",      "EMBER_UNSUPPORTED",      "EMBER_OUT_OF_MEMORY",
        "EMBER_DEVICE_LOST", "EMBER_ABORTED",          "EMBER_INTERNAL",
        "EMBER_BUFFER_TOO_SMALL"};
    for (int i = 0; i < (int)(sizeof names / sizeof names[0]); ++i)
        EXPECT(strcmp(ember_status_str(i), names[i]) == 0);
    EXPECT(strcmp(ember_status_str(1234), "EMBER_UNKNOWN_STATUS") == 0);
    EXPECT(strcmp(ember_status_str(-1), "EMBER_UNKNOWN_STATUS") == 0);
    EXPECT(EMBER_CHECK_ABI());
    EXPECT(ember_version()[0] != '\0');

    /* A panic inside Ember becomes EMBER_INTERNAL, not a crash. */
    EXPECT_STATUS(ember_debug_internal_panic(), EMBER_INTERNAL, "panic");

    /* Freeing NULL is a no-op everywhere. */
    ember_string_free(NULL);
    ember_context_free(NULL);
    ember_model_free(NULL);
    ember_session_free(NULL);
    ember_adapter_free(NULL);
    ember_trainer_free(NULL);

    /* Contexts. */
    EXPECT_STATUS(ember_context_create(NULL, NULL), EMBER_INVALID_ARGUMENT, "out");
    ember_context_params cp = ember_context_default_params();
    cp.struct_size = 2;
    ctx = POISON(ember_context);
    EXPECT_STATUS(ember_context_create(&cp, &ctx), EMBER_INVALID_ARGUMENT, "struct_size");
    EXPECT_NULL(ctx);
    cp = ember_context_default_params();
    cp.backend = "no-such-backend";
    EXPECT_STATUS(ember_context_create(&cp, &ctx), EMBER_INVALID_ARGUMENT, "no-such-backend");
    EXPECT_NULL(ctx);
    text = POISON(char); /* string outputs, too, are NULL after a failure */
    EXPECT_STATUS(ember_context_info_json(NULL, &text), EMBER_INVALID_ARGUMENT, "NULL");
    EXPECT_NULL(text);
    text = POISON(char);
    EXPECT_STATUS(ember_model_info_json(NULL, &text), EMBER_INVALID_ARGUMENT, "NULL");
    EXPECT_NULL(text);
    /* The log callback hears about the device chosen. */
    int n_logs = 0;
    ember_set_log_callback(count_logs, &n_logs);
    EXPECT_STATUS(ember_context_create(NULL, &ctx), EMBER_OK, NULL);
    ember_set_log_callback(NULL, NULL);
    if (ctx == NULL) goto done;
    EXPECT(n_logs > 0);
    EXPECT_STATUS(ember_context_info_json(ctx, NULL), EMBER_INVALID_ARGUMENT, "out_json");

    /* Models: NULL arguments, files that are missing or malformed, an aborted load. */
    model = POISON(ember_model);
    EXPECT_STATUS(ember_model_load(NULL, model_path, NULL, &model), EMBER_INVALID_ARGUMENT,
                  "ember_context");
    EXPECT_NULL(model);
    EXPECT_STATUS(ember_model_load(ctx, NULL, NULL, &model), EMBER_INVALID_ARGUMENT, "path");
    EXPECT_STATUS(ember_model_load(ctx, model_path, NULL, NULL), EMBER_INVALID_ARGUMENT, "out");
    EXPECT_STATUS(ember_model_load(ctx, "bad-\xff\xfe.gguf", NULL, &model),
                  EMBER_INVALID_ARGUMENT, "UTF-8");
    snprintf(path, sizeof path, "%s/does-not-exist.gguf", work);
    EXPECT_STATUS(ember_model_load(ctx, path, NULL, &model), EMBER_IO, "does-not-exist");
    EXPECT_NULL(model);
    snprintf(path, sizeof path, "%s/malformed.gguf", work);
    static const char junk[] = "GGUF\x03\0\0\0 this is not a tensor table";
    EXPECT(write_file(path, junk, sizeof junk) == 0);
    model = POISON(ember_model);
    EXPECT_STATUS(ember_model_load(ctx, path, NULL, &model), EMBER_FORMAT, "malformed.gguf");
    EXPECT_NULL(model);
    snprintf(path, sizeof path, "%s/text.gguf", work);
    EXPECT(write_file(path, "hello\n", 6) == 0);
    EXPECT_STATUS(ember_model_load(ctx, path, NULL, &model), EMBER_FORMAT, "text.gguf");
    ember_model_params mp = ember_model_default_params();
    mp.struct_size = 0;
    EXPECT_STATUS(ember_model_load(ctx, model_path, &mp, &model), EMBER_INVALID_ARGUMENT,
                  "struct_size");
    int progress_calls = 0;
    mp = ember_model_default_params();
    mp.progress = abort_load;
    mp.progress_user_data = &progress_calls;
    model = POISON(ember_model);
    EXPECT_STATUS(ember_model_load(ctx, model_path, &mp, &model), EMBER_ABORTED, NULL);
    EXPECT_NULL(model);
    EXPECT(progress_calls == 1);

    EXPECT_STATUS(ember_model_load(ctx, model_path, NULL, &model), EMBER_OK, NULL);
    if (model == NULL) goto done;

    ember_model_info info = {.struct_size = 0};
    EXPECT_STATUS(ember_model_get_info(model, &info), EMBER_INVALID_ARGUMENT, "struct_size");
    EXPECT_STATUS(ember_model_get_info(model, NULL), EMBER_INVALID_ARGUMENT, "info");
    info.struct_size = sizeof info;
    EXPECT_STATUS(ember_model_get_info(model, &info), EMBER_OK, NULL);

    /* Tokens: buffers too small report the size needed; bad input is refused. */
    const char *hello = "Hello, world";
    uint32_t ids[64];
    size_t n_ids = 0;
    EXPECT_STATUS(ember_tokenize(model, hello, strlen(hello), false, false, ids, 1, &n_ids),
                  EMBER_BUFFER_TOO_SMALL, "do not fit");
    EXPECT(n_ids > 1 && n_ids <= 64);
    EXPECT_STATUS(ember_tokenize(model, hello, strlen(hello), false, false, ids, 64, &n_ids),
                  EMBER_OK, NULL);
    EXPECT_STATUS(ember_tokenize(model, "\xc3(", 2, false, false, ids, 64, &n_ids),
                  EMBER_INVALID_ARGUMENT, "UTF-8");
    EXPECT_STATUS(ember_tokenize(model, hello, strlen(hello), false, false, ids, 64, NULL),
                  EMBER_INVALID_ARGUMENT, "n_tokens");
    char small[4];
    size_t text_len = 0;
    EXPECT_STATUS(ember_detokenize(model, ids, 12, false, small, sizeof small, &text_len),
                  EMBER_BUFFER_TOO_SMALL, "do not fit");
    EXPECT(text_len == strlen(hello));
    const uint32_t outside = info.vocab;
    EXPECT_STATUS(ember_detokenize(model, &outside, 1, false, small, sizeof small, &text_len),
                  EMBER_INVALID_ARGUMENT, "vocabulary");
    EXPECT(!ember_token_is_eog(NULL, 0));

    /* Chat templates: NULL messages and roles are refused; a model without a template says
     * so (EMBER_UNSUPPORTED). */
    ember_chat_message msg = {"user", "hi"};
    EXPECT_STATUS(ember_chat_template_apply(model, NULL, 1, true, &text), EMBER_INVALID_ARGUMENT,
                  "messages");
    msg.role = NULL;
    EXPECT_STATUS(ember_chat_template_apply(model, &msg, 1, true, &text), EMBER_INVALID_ARGUMENT,
                  "role");
    msg.role = "user";
    text = POISON(char);
    ember_status st = ember_chat_template_apply(model, &msg, 1, true, &text);
    if (st == EMBER_OK) {
        EXPECT(text != NULL && strstr(text, "hi") != NULL);
        ember_string_free(text);
        text = NULL;
    } else {
        check_status(__LINE__, "ember_chat_template_apply(no template)", st, EMBER_UNSUPPORTED,
                     "chat template");
        EXPECT_NULL(text);
    }

    /* Sessions. */
    ember_session_params sp = ember_session_default_params();
    sp.struct_size = 8;
    session = POISON(ember_session);
    EXPECT_STATUS(ember_session_create(model, &sp, &session), EMBER_INVALID_ARGUMENT,
                  "struct_size");
    EXPECT_NULL(session);
    EXPECT_STATUS(ember_session_create(NULL, NULL, &session), EMBER_INVALID_ARGUMENT,
                  "ember_model");
    sp = ember_session_default_params();
    sp.n_ctx = 64;
    EXPECT_STATUS(ember_session_create(model, &sp, &session), EMBER_OK, NULL);
    if (session == NULL) goto done;

    /* Generation: bad parameters, then a callback that stops it after two tokens. */
    ember_generate_params gp = ember_generate_default_params();
    gp.max_tokens = 4;
    gp.sampler.temperature = 0.0f;
    text = POISON(char);
    EXPECT_STATUS(ember_session_generate(session, NULL, &gp, NULL, &text), EMBER_INVALID_ARGUMENT,
                  "prompt");
    EXPECT_NULL(text);
    gp.struct_size = 4;
    EXPECT_STATUS(ember_session_generate(session, "Hi", &gp, NULL, &text), EMBER_INVALID_ARGUMENT,
                  "struct_size");
    gp = ember_generate_default_params();
    gp.max_tokens = 4;
    gp.sampler.struct_size = 0;
    EXPECT_STATUS(ember_session_generate(session, "Hi", &gp, NULL, &text), EMBER_INVALID_ARGUMENT,
                  "ember_sampler_params");
    gp.sampler = ember_sampler_default_params();
    gp.sampler.temperature = 0.0f;
    gp.n_stop = 1;
    EXPECT_STATUS(ember_session_generate(session, "Hi", &gp, NULL, &text), EMBER_INVALID_ARGUMENT,
                  "stop");
    gp.n_stop = 0;
    gp.adapter = 7;
    EXPECT_STATUS(ember_session_generate(session, "Hi", &gp, NULL, &text), EMBER_INVALID_ARGUMENT,
                  "7");
    gp.adapter = -1;
    int n_tokens_seen = 0;
    gp.on_token = stop_after_two;
    gp.user_data = &n_tokens_seen;
    ember_generate_result res = {.struct_size = sizeof res};
    EXPECT_STATUS(ember_session_generate(session, "Hi", &gp, &res, &text), EMBER_ABORTED,
                  "callback");
    /* An aborted generation still hands back what it made: free it. */
    EXPECT(n_tokens_seen == 2 && res.n_tokens == 2 && res.stop_reason == EMBER_STOP_CALLBACK);
    EXPECT(text != NULL);
    ember_string_free(text);
    text = NULL;
    /* The session is usable after the abort. */
    gp.on_token = NULL;
    EXPECT_STATUS(ember_session_generate(session, "Hi", &gp, &res, NULL), EMBER_OK, NULL);
    EXPECT(res.n_tokens > 0);

    size_t n_logits = 0;
    float logit;
    EXPECT_STATUS(ember_session_evaluate(session, ids, 2, &logit, 1, &n_logits),
                  EMBER_BUFFER_TOO_SMALL, "do not fit");
    EXPECT(n_logits == 2 * (size_t)info.vocab);
    uint32_t next = 0;
    EXPECT_STATUS(ember_seq_prefill(session, 12345, ids, 2, &next), EMBER_INVALID_ARGUMENT,
                  NULL);
    EXPECT_STATUS(ember_seq_remove(session, 12345), EMBER_INVALID_ARGUMENT, NULL);
    EXPECT_STATUS(ember_seq_decode(session, NULL, 1, &next), EMBER_INVALID_ARGUMENT, "seqs");
    double ppl = 0;
    size_t scored = 0;
    EXPECT_STATUS(ember_session_perplexity(session, hello, 1000, &ppl, &scored),
                  EMBER_INVALID_ARGUMENT, NULL);

    /* Adapters: missing and malformed directories. */
    adapter = POISON(ember_adapter);
    snprintf(path, sizeof path, "%s/no-adapter", work);
    EXPECT_STATUS(ember_adapter_load(model, path, &adapter), EMBER_IO, "no-adapter");
    EXPECT_NULL(adapter);
    snprintf(path, sizeof path, "%s/adapter_config.json", work);
    EXPECT(write_file(path, "{not json", 9) == 0);
    EXPECT_STATUS(ember_adapter_load(model, work, &adapter), EMBER_FORMAT,
                  "adapter_config.json");
    EXPECT_NULL(adapter);
    int32_t id = -1;
    EXPECT_STATUS(ember_session_attach_adapter(session, NULL, "x", &id), EMBER_INVALID_ARGUMENT,
                  "ember_adapter");
    EXPECT_STATUS(ember_session_detach_adapter(session, 99), EMBER_INVALID_ARGUMENT, "99");
    EXPECT_STATUS(ember_adapter_combine(NULL, NULL, 0, &adapter), EMBER_INVALID_ARGUMENT, NULL);

    /* Training: bad settings, bad data, a callback that stops. */
    ember_train_params tp = ember_train_default_params();
    tp.struct_size = 16;
    trainer = POISON(ember_trainer);
    EXPECT_STATUS(ember_trainer_create(model, &tp, &trainer), EMBER_INVALID_ARGUMENT,
                  "struct_size");
    EXPECT_NULL(trainer);
    tp = ember_train_default_params();
    tp.seq_len = 33;
    EXPECT_STATUS(ember_trainer_create(model, &tp, &trainer), EMBER_INVALID_ARGUMENT,
                  "multiple of 32");
    tp = ember_train_default_params();
    tp.lora_rank = 0;
    EXPECT_STATUS(ember_trainer_create(model, &tp, &trainer), EMBER_INVALID_ARGUMENT,
                  "nothing to train");
    tp = ember_train_default_params();
    tp.lr = -1.0f;
    EXPECT_STATUS(ember_trainer_create(model, &tp, &trainer), EMBER_INVALID_ARGUMENT, "lr");
    tp = ember_train_default_params();
    tp.lora_rank = 2;
    tp.lora_targets = EMBER_TARGET_Q;
    tp.seq_len = 32;
    EXPECT_STATUS(ember_trainer_create(model, &tp, &trainer), EMBER_OK, NULL);
    if (trainer == NULL) goto done;
    EXPECT_STATUS(ember_trainer_step(trainer, "{not json", NULL), EMBER_INVALID_ARGUMENT,
                  "invalid JSON");
    EXPECT_STATUS(ember_trainer_step(trainer, "{\"text\": 5}", NULL), EMBER_INVALID_ARGUMENT,
                  "\"text\"");
    EXPECT_STATUS(ember_trainer_step(trainer, "", NULL), EMBER_INVALID_ARGUMENT,
                  "no training records");
    EXPECT_STATUS(ember_trainer_step_tokens(trainer, ids, NULL, NULL, 0, NULL),
                  EMBER_INVALID_ARGUMENT, "no sequences");
    const uint32_t two_outside[2] = {outside, outside};
    const size_t two = 2;
    EXPECT_STATUS(ember_trainer_step_tokens(trainer, two_outside, NULL, &two, 1, NULL),
                  EMBER_INVALID_ARGUMENT, "vocabulary");
    snprintf(path, sizeof path, "%s/missing.jsonl", work);
    EXPECT_STATUS(ember_trainer_train_file(trainer, path, 2, 1, NULL, NULL, NULL), EMBER_IO,
                  "missing.jsonl");
    snprintf(path, sizeof path, "%s/data.jsonl", work);
    static const char data[] = "{\"text\": \"one two three\"}\n{\"text\": \"four five six\"}\n";
    EXPECT(write_file(path, data, sizeof data - 1) == 0);
    EXPECT_STATUS(ember_trainer_train_file(trainer, path, 0, 1, NULL, NULL, NULL),
                  EMBER_INVALID_ARGUMENT, "steps");
    uint32_t stopped_at = 0;
    EXPECT_STATUS(ember_trainer_train_file(trainer, path, 3, 1, stop_training, &stopped_at, NULL),
                  EMBER_ABORTED, "after 1 steps");
    EXPECT(stopped_at == 1);
    /* A directory below a regular file cannot be created. */
    snprintf(path, sizeof path, "%s/data.jsonl/lora", work);
    EXPECT_STATUS(ember_trainer_save(trainer, path), EMBER_IO, NULL);

done:
    ember_trainer_free(trainer);
    ember_adapter_free(adapter);
    ember_string_free(text);
    ember_session_free(session);
    ember_model_free(model);
    ember_context_free(ctx);
    printf("%d checks, %d failed\n", n_checks, n_failures);
    return n_failures == 0 ? 0 : 1;
}
