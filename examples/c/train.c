/* Trains a LoRA adapter through the C ABI, saves it, loads it back and generates with it.
 *
 *     train MODEL WORKDIR [--steps N] [-n MAX_TOKENS]
 *
 * Writes a tiny JSONL data set to WORKDIR/train.jsonl, trains a rank-4 LoRA on the query and
 * value projections for N steps (default 8) in batches of 2, saves it to WORKDIR/lora (PEFT
 * layout), loads that directory as an adapter, attaches it to a session and generates with
 * and without it. Checks that training lowered the loss and that the saved adapter
 * generates exactly what the trainer's in-memory snapshot does.
 */
#include <ember.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const char *const records[] = {
    "{\"prompt\": \"Quillfeather is \", \"completion\": \"a river town.\"}",
    "{\"prompt\": \"The ferry leaves at \", \"completion\": \"dawn.\"}",
    "{\"prompt\": \"Bread in Quillfeather \", \"completion\": \"is rye.\"}",
    "{\"text\": \"The lamps of Quillfeather burn blue.\"}",
};

static int fail(const char *what, ember_status st) {
    fprintf(stderr, "train: %s failed: %s: %s\n", what, ember_status_str(st), ember_last_error());
    return 1;
}

/* Progress of ember_trainer_train_file: one line per step. */
static bool on_step(uint32_t step, uint32_t total, const ember_step_result *r, void *user_data) {
    (void)user_data;
    fprintf(stderr, "step %u/%u: loss %.4f, grad norm %.3f, lr %.2g, %llu tokens%s\n", step,
            total, r->loss, (double)r->grad_norm, (double)r->lr, (unsigned long long)r->tokens,
            r->skipped ? " (skipped)" : "");
    return true;
}

/* Greedy generation with adapter `id` (-1: the base model) into `*out` (caller frees). */
static ember_status generate(ember_session *s, int32_t id, uint32_t max_tokens, char **out) {
    ember_generate_params gp = ember_generate_default_params();
    gp.max_tokens = max_tokens;
    gp.sampler.temperature = 0.0f;
    gp.adapter = id;
    return ember_session_generate(s, "Quillfeather is ", &gp, NULL, out);
}

int main(int argc, char **argv) {
    const char *model_path = NULL, *work = NULL;
    uint32_t steps = 8, max_tokens = 16;
    for (int i = 1; i < argc; ++i) {
        if (strcmp(argv[i], "--steps") == 0 && i + 1 < argc) {
            steps = (uint32_t)strtoul(argv[++i], NULL, 10);
        } else if (strcmp(argv[i], "-n") == 0 && i + 1 < argc) {
            max_tokens = (uint32_t)strtoul(argv[++i], NULL, 10);
        } else if (argv[i][0] == '-') {
            model_path = NULL;
            break;
        } else if (model_path == NULL) {
            model_path = argv[i];
        } else if (work == NULL) {
            work = argv[i];
        }
    }
    if (model_path == NULL || work == NULL || steps == 0) {
        fprintf(stderr, "usage: %s MODEL WORKDIR [--steps N] [-n MAX_TOKENS]\n", argv[0]);
        return 2;
    }

    int rc = 1;
    ember_context *ctx = NULL;
    ember_model *model = NULL;
    ember_trainer *trainer = NULL;
    ember_adapter *snapshot = NULL, *loaded = NULL;
    ember_session *session = NULL;
    char *json = NULL, *base_text = NULL, *snap_text = NULL, *lora_text = NULL;
    ember_status st;
    char data_path[4096], lora_dir[4096];
    snprintf(data_path, sizeof data_path, "%s/train.jsonl", work);
    snprintf(lora_dir, sizeof lora_dir, "%s/lora", work);

    /* The data set: one JSON record per line. */
    FILE *f = fopen(data_path, "w");
    if (f == NULL) {
        perror(data_path);
        return 1;
    }
    for (size_t i = 0; i < sizeof records / sizeof records[0]; ++i) fprintf(f, "%s\n", records[i]);
    if (fclose(f) != 0) {
        perror(data_path);
        return 1;
    }

    if ((st = ember_context_create(NULL, &ctx)) != EMBER_OK) {
        rc = fail("ember_context_create", st);
        goto done;
    }
    if ((st = ember_model_load(ctx, model_path, NULL, &model)) != EMBER_OK) {
        rc = fail("ember_model_load", st);
        goto done;
    }

    ember_train_params tp = ember_train_default_params();
    tp.lora_rank = 4;
    tp.lora_targets = EMBER_TARGET_Q | EMBER_TARGET_V;
    tp.seq_len = 64;
    tp.lr = 1e-2f;
    tp.schedule = EMBER_LR_CONSTANT;
    tp.seed = 1;
    if ((st = ember_trainer_create(model, &tp, &trainer)) != EMBER_OK) {
        rc = fail("ember_trainer_create", st);
        goto done;
    }
    double before = 0, after = 0, last = 0;
    if ((st = ember_trainer_evaluate(trainer, records[0], &before)) != EMBER_OK) {
        rc = fail("ember_trainer_evaluate", st);
        goto done;
    }
    st = ember_trainer_train_file(trainer, data_path, steps, 2, on_step, NULL, &last);
    if (st != EMBER_OK) {
        rc = fail("ember_trainer_train_file", st);
        goto done;
    }
    if ((st = ember_trainer_evaluate(trainer, records[0], &after)) != EMBER_OK) {
        rc = fail("ember_trainer_evaluate", st);
        goto done;
    }
    fprintf(stderr, "loss of the first record: %.4f before, %.4f after %u steps\n", before,
            after, steps);
    if ((st = ember_trainer_info_json(trainer, &json)) != EMBER_OK) {
        rc = fail("ember_trainer_info_json", st);
        goto done;
    }
    printf("trainer: %s\n", json);
    ember_string_free(json);
    json = NULL;

    /* Save (atomically, PEFT layout), and keep an in-memory snapshot to compare with. */
    if ((st = ember_trainer_save(trainer, lora_dir)) != EMBER_OK) {
        rc = fail("ember_trainer_save", st);
        goto done;
    }
    if ((st = ember_trainer_get_adapter(trainer, &snapshot)) != EMBER_OK) {
        rc = fail("ember_trainer_get_adapter", st);
        goto done;
    }
    ember_trainer_free(trainer); /* its GPU buffers are not needed any more */
    trainer = NULL;

    if ((st = ember_adapter_load(model, lora_dir, &loaded)) != EMBER_OK) {
        rc = fail("ember_adapter_load", st);
        goto done;
    }
    if ((st = ember_adapter_info_json(loaded, &json)) != EMBER_OK) {
        rc = fail("ember_adapter_info_json", st);
        goto done;
    }
    printf("adapter: %s\n", json);

    ember_session_params sp = ember_session_default_params();
    sp.n_ctx = 128;
    if ((st = ember_session_create(model, &sp, &session)) != EMBER_OK) {
        rc = fail("ember_session_create", st);
        goto done;
    }
    int32_t lora_id = -1, snap_id = -1;
    if ((st = ember_session_attach_adapter(session, loaded, "quillfeather", &lora_id)) !=
            EMBER_OK ||
        (st = ember_session_attach_adapter(session, snapshot, "snapshot", &snap_id)) != EMBER_OK) {
        rc = fail("ember_session_attach_adapter", st);
        goto done;
    }
    /* The session holds its own copies: the handles may go. */
    ember_adapter_free(loaded);
    ember_adapter_free(snapshot);
    loaded = snapshot = NULL;

    if ((st = generate(session, -1, max_tokens, &base_text)) != EMBER_OK ||
        (st = generate(session, lora_id, max_tokens, &lora_text)) != EMBER_OK ||
        (st = generate(session, snap_id, max_tokens, &snap_text)) != EMBER_OK) {
        rc = fail("ember_session_generate", st);
        goto done;
    }
    printf("base:    \"%s\"\nadapter: \"%s\"\n", base_text, lora_text);
    if ((st = ember_session_detach_adapter(session, lora_id)) != EMBER_OK ||
        (st = ember_session_detach_adapter(session, snap_id)) != EMBER_OK) {
        rc = fail("ember_session_detach_adapter", st);
        goto done;
    }

    if (!(after < before)) {
        fprintf(stderr, "train: training did not lower the loss (%f -> %f)\n", before, after);
    } else if (strcmp(lora_text, snap_text) != 0) {
        fprintf(stderr, "train: the saved adapter generates \"%s\", the snapshot \"%s\"\n",
                lora_text, snap_text);
    } else {
        rc = 0;
    }

done:
    ember_string_free(json);
    ember_string_free(base_text);
    ember_string_free(lora_text);
    ember_string_free(snap_text);
    ember_session_free(session);
    ember_adapter_free(loaded);
    ember_adapter_free(snapshot);
    ember_trainer_free(trainer);
    ember_model_free(model);
    ember_context_free(ctx);
    return rc;
}
