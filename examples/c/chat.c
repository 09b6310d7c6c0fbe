/* A chat loop through the C ABI: reads one user message per line from stdin, renders the
 * whole conversation with the model's chat template and streams the reply to stdout.
 *
 *     chat MODEL [-n MAX_TOKENS] [--system TEXT] [--temp T] [--seed S] [--plain] [--show-prompt]
 *
 * Ends at end of input (so `printf 'Hi\nBye\n' | chat MODEL` works) or on a line `/quit`;
 * `/reset` forgets the conversation. A model without a chat template is refused
 * (EMBER_UNSUPPORTED) unless `--plain` asks for a plain "User:/Assistant:" transcript.
 * `--show-prompt` prints each rendered prompt to stderr.
 * Every turn re-renders the conversation into a fresh sequence: simple, and exact; a real
 * application would keep the sequence and feed only the new tokens (ember_seq_prefill).
 */
#include <ember.h>

#include <ctype.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct message {
    char *role; /* owned */
    char *content;
} message;

typedef struct conversation {
    message *items;
    size_t n, cap;
} conversation;

static char *dup_str(const char *s) {
    size_t n = strlen(s) + 1;
    char *d = malloc(n);
    if (d != NULL) memcpy(d, s, n);
    return d;
}

static int conversation_push(conversation *c, const char *role, const char *content) {
    if (c->n == c->cap) {
        size_t cap = c->cap ? 2 * c->cap : 8;
        message *items = realloc(c->items, cap * sizeof *items);
        if (items == NULL) return -1;
        c->items = items;
        c->cap = cap;
    }
    message m = {dup_str(role), dup_str(content)};
    if (m.role == NULL || m.content == NULL) {
        free(m.role);
        free(m.content);
        return -1;
    }
    c->items[c->n++] = m;
    return 0;
}

static void conversation_clear(conversation *c, size_t keep) {
    while (c->n > keep) {
        --c->n;
        free(c->items[c->n].role);
        free(c->items[c->n].content);
    }
}

/* Reads one line of any length without its newline; NULL at end of input. */
static char *read_line(FILE *f) {
    size_t cap = 128, n = 0;
    char *buf = malloc(cap);
    if (buf == NULL) return NULL;
    int ch;
    while ((ch = fgetc(f)) != EOF && ch != '\n') {
        if (n + 1 == cap) {
            char *b = realloc(buf, cap *= 2);
            if (b == NULL) {
                free(buf);
                return NULL;
            }
            buf = b;
        }
        buf[n++] = (char)ch;
    }
    if (ch == EOF && n == 0) {
        free(buf);
        return NULL;
    }
    if (n > 0 && buf[n - 1] == '\r') --n;
    buf[n] = '\0';
    return buf;
}

/* The plain transcript used by --plain: "System: ...\nUser: ...\nAssistant:". */
static char *render_plain(const conversation *c) {
    size_t len = sizeof "Assistant:";
    for (size_t i = 0; i < c->n; ++i)
        len += strlen(c->items[i].role) + strlen(c->items[i].content) + 4;
    char *out = malloc(len), *p = out;
    if (out == NULL) return NULL;
    for (size_t i = 0; i < c->n; ++i) {
        const char *r = c->items[i].role;
        p += sprintf(p, "%c%s: %s\n", toupper((unsigned char)r[0]), r + 1, c->items[i].content);
    }
    strcpy(p, "Assistant:");
    return out;
}

/* `prompt` comes from malloc in plain mode and from Ember in template mode. */
static void free_prompt(char *prompt, bool plain) {
    if (plain)
        free(prompt);
    else
        ember_string_free(prompt);
}

static bool on_token(uint32_t token, const char *piece, size_t piece_len, void *user_data) {
    (void)token;
    (void)user_data;
    fwrite(piece, 1, piece_len, stdout);
    fflush(stdout);
    return true;
}

static int fail(const char *what, ember_status st) {
    fprintf(stderr, "chat: %s failed: %s: %s\n", what, ember_status_str(st), ember_last_error());
    return 1;
}

static int usage(const char *argv0) {
    fprintf(stderr,
            "usage: %s MODEL [-n MAX_TOKENS] [--system TEXT] [--temp T] [--seed S] [--plain] "
            "[--show-prompt]\n",
            argv0);
    return 2;
}

int main(int argc, char **argv) {
    const char *model_path = NULL, *system = NULL;
    bool plain = false, show_prompt = false;
    ember_generate_params gp = ember_generate_default_params();
    gp.max_tokens = 64;
    for (int i = 1; i < argc; ++i) {
        const char *a = argv[i];
        const int has_value = i + 1 < argc;
        if (strcmp(a, "-n") == 0 && has_value) {
            gp.max_tokens = (uint32_t)strtoul(argv[++i], NULL, 10);
        } else if (strcmp(a, "--system") == 0 && has_value) {
            system = argv[++i];
        } else if (strcmp(a, "--temp") == 0 && has_value) {
            gp.sampler.temperature = strtof(argv[++i], NULL);
        } else if (strcmp(a, "--seed") == 0 && has_value) {
            gp.sampler.seed = strtoull(argv[++i], NULL, 10);
        } else if (strcmp(a, "--plain") == 0) {
            plain = true;
        } else if (strcmp(a, "--show-prompt") == 0) {
            show_prompt = true;
        } else if (a[0] == '-' || model_path != NULL) {
            return usage(argv[0]);
        } else {
            model_path = a;
        }
    }
    if (model_path == NULL) return usage(argv[0]);

    int rc = 1;
    ember_context *ctx = NULL;
    ember_model *model = NULL;
    ember_session *session = NULL;
    conversation conv = {NULL, 0, 0};
    char *line = NULL, *prompt = NULL, *reply = NULL;
    ember_status st;
    /* In plain mode the model would go on with the user's next turn: stop there. */
    const char *const plain_stop[] = {"\nUser:"};

    if ((st = ember_context_create(NULL, &ctx)) != EMBER_OK) {
        rc = fail("ember_context_create", st);
        goto done;
    }
    if ((st = ember_model_load(ctx, model_path, NULL, &model)) != EMBER_OK) {
        rc = fail("ember_model_load", st);
        goto done;
    }
    ember_session_params sp = ember_session_default_params();
    sp.n_ctx = 1024;
    if ((st = ember_session_create(model, &sp, &session)) != EMBER_OK) {
        rc = fail("ember_session_create", st);
        goto done;
    }
    if (system != NULL && conversation_push(&conv, "system", system) != 0) goto oom;
    const size_t n_keep = conv.n;
    if (plain) {
        gp.stop = plain_stop;
        gp.n_stop = 1;
    }
    gp.on_token = on_token;

    for (;;) {
        fputs("> ", stderr);
        if ((line = read_line(stdin)) == NULL) break; /* end of input */
        if (strcmp(line, "/quit") == 0) break;
        if (strcmp(line, "/reset") == 0) {
            conversation_clear(&conv, n_keep);
            fputs("(conversation cleared)\n", stderr);
        } else if (line[0] != '\0') {
            if (conversation_push(&conv, "user", line) != 0) goto oom;
            if (plain) {
                if ((prompt = render_plain(&conv)) == NULL) goto oom;
            } else {
                /* ember_chat_message borrows the strings: conv keeps them alive. */
                ember_chat_message *msgs = malloc(conv.n * sizeof *msgs);
                if (msgs == NULL) goto oom;
                for (size_t i = 0; i < conv.n; ++i)
                    msgs[i] = (ember_chat_message){conv.items[i].role, conv.items[i].content};
                st = ember_chat_template_apply(model, msgs, conv.n, true, &prompt);
                free(msgs);
                if (st != EMBER_OK) {
                    if (st == EMBER_UNSUPPORTED)
                        fputs("chat: this model has no chat template; try --plain\n", stderr);
                    rc = fail("ember_chat_template_apply", st);
                    goto done;
                }
            }
            if (show_prompt) fprintf(stderr, "[prompt]\n%s\n[/prompt]\n", prompt);
            ember_generate_result res = {.struct_size = sizeof res};
            st = ember_session_generate(session, prompt, &gp, &res, &reply);
            fputc('\n', stdout);
            if (st != EMBER_OK) {
                rc = fail("ember_session_generate", st);
                goto done;
            }
            if (res.stop_reason == EMBER_STOP_CONTEXT)
                fputs("(the context is full: /reset to go on)\n", stderr);
            /* The reply joins the conversation for the next turn. */
            if (conversation_push(&conv, "assistant", reply) != 0) goto oom;
            free_prompt(prompt, plain);
            ember_string_free(reply);
            prompt = reply = NULL;
        }
        free(line);
        line = NULL;
    }
    rc = 0;
    goto done;

oom:
    fputs("chat: out of memory\n", stderr);
done:
    free_prompt(prompt, plain);
    ember_string_free(reply);
    free(line);
    conversation_clear(&conv, 0);
    free(conv.items);
    ember_session_free(session);
    ember_model_free(model);
    ember_context_free(ctx);
    return rc;
}
