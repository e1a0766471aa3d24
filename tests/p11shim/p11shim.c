/*
 * p11shim — a PKCS#11 (v2.40) module that forwards every call to a real module and injects
 * faults on command: an unplugged / replugged USB token, a slow token, a refused PIN.
 * For the spyrus-hsm tests; not for production use.
 *
 * Build (the project's Makefile, `make shim`):
 *   cc -shared -fPIC -O2 -Wall -Wextra -Werror -I/usr/include/p11-kit-1 -I/usr/include/PCSC \
 *      -o .build/libp11shim.so tests/p11shim/p11shim.c -ldl -lpthread
 *
 * Environment
 *   P11SHIM_TARGET   the real module (default /usr/lib/softhsm/libsofthsm2.so); dlopen'ed
 *                    once, on the first C_GetFunctionList or C_Initialize, never unloaded.
 *   P11SHIM_CONTROL  path of the control file; read on the first C_GetFunctionList and again
 *                    on every C_Initialize. Unset or empty: always plugged, no faults.
 *
 * Control file: lines `key=value` (spaces around key and value ignored; empty lines and lines
 * starting with '#' ignored; unknown keys and bad values ignored; only the first 4 KiB read).
 *   state=plugged | state=unplugged
 *   unplug_slot=N[,N...]  only the token in these slots (decimal slot ids as the target reports
 *                     them, at most 8; bad entries ignored, several lines add up) is unplugged:
 *                     everything below under "Unplugged" applies to those slots alone (C_Login,
 *                     being on a session, and every session call go by the session's slot), and
 *                     the other slots work normally. state=unplugged still means every slot.
 *   sign_delay_ms=N   sleep N ms (0..600000) in C_Sign / C_SignFinal (not in their length
 *                     query, i.e. when the output buffer is NULL) and C_SignUpdate, before
 *                     forwarding; if the token is unplugged during the sleep (state=unplugged, or
 *                     unplug_slot naming the slot of the call's session) the call answers
 *                     CKR_DEVICE_REMOVED at once (the state is polled every 5 ms).
 *   fail_login=1      C_Login answers CKR_PIN_INCORRECT without forwarding (0 = off).
 *   fail_create_class=N  C_CreateObject of a template whose CKA_CLASS is N (0 data, 1 certificate,
 *                     2 public key, 3 private key, 4 secret key) answers CKR_DEVICE_MEMORY without
 *                     forwarding: a token that fills up half-way through a multi-object write.
 *   fail_set_class=N  C_SetAttributeValue on an object whose CKA_CLASS is N answers
 *                     CKR_DEVICE_MEMORY without forwarding (absent: both off).
 *   serial=1          tokens that execute one signing operation at a time: the calls that
 *                     sign_delay_ms slows down take a lock of their session's slot for their
 *                     delay and the forwarded call, so concurrent sessions of one slot sign one
 *                     after the other while two slots sign in parallel (0 = off; the lock is not
 *                     taken for a length query). One lock per slot for the first 16 slots seen;
 *                     further slots, and sessions the shim did not open, share one more lock.
 *   watch_thread=main | watch_thread=TID
 *   thread_log=PATH   every call made on the watched thread (the process's main thread, whose
 *                     thread id is the process id, or the thread with that id) appends one line
 *                     "<function> <tid>" to PATH: how the tests prove that no PKCS#11 call,
 *                     pkcs11-provider's included, runs on an event loop's thread.
 *   profile=smartcard a smart card's limits, each also settable alone (the keys below win over
 *                     the profile's values, whatever the order of the lines): max_sessions=4,
 *                     copy_object=0, and hide_mechanisms gains CKM_ECDSA_SHA1/224/256/384/512
 *                     (raw CKM_ECDSA only: the caller hashes). profile=none (or absent) = SoftHSM's.
 *   max_sessions=N    C_OpenSession answers CKR_SESSION_COUNT, without forwarding, while N sessions
 *                     of that slot opened through the shim are open in this process (0 = no cap;
 *                     sessions a replug or C_CloseAllSessions ended do not count). C_GetTokenInfo
 *                     then reports ulMaxSessionCount = ulMaxRwSessionCount = N and ulSessionCount
 *                     = the sessions open (ulRwSessionCount: CK_UNAVAILABLE_INFORMATION).
 *   copy_object=0     C_CopyObject answers CKR_FUNCTION_NOT_SUPPORTED without forwarding (1 = on).
 *   hide_mechanisms=M[,M...]  mechanisms the token does not have: C_GetMechanismList leaves them
 *                     out, C_GetMechanismInfo and every call taking a mechanism (C_SignInit,
 *                     C_VerifyInit, C_EncryptInit, C_DigestInit, C_GenerateKey(Pair), C_DeriveKey,
 *                     C_WrapKey, C_UnwrapKey, ...) answer CKR_MECHANISM_INVALID. M is a number
 *                     (decimal or 0x hex) or a name: CKM_ECDSA, CKM_ECDSA_SHA1 .. CKM_ECDSA_SHA512,
 *                     CKM_SHA256_HMAC, CKM_SHA384_HMAC, CKM_SHA512_HMAC, CKM_SHA256_RSA_PKCS,
 *                     CKM_SHA256_RSA_PKCS_PSS, CKM_RSA_PKCS, CKM_RSA_PKCS_PSS (at most 32; unknown
 *                     names ignored). Added to the profile's list.
 *   max_objects=N     a token that holds N token objects (CKA_TOKEN=TRUE) at most: a call that would
 *                     store more (C_CreateObject, C_CopyObject, C_GenerateKey, C_GenerateKeyPair
 *                     (2 objects), C_UnwrapKey, C_DeriveKey) answers CKR_DEVICE_MEMORY without
 *                     forwarding. The objects are counted on the token at each such call, by a
 *                     session of this process (so a logged-in process counts its private ones).
 *   free_objects=N    room for N more token objects, counted by this process from the moment the
 *                     setting (or any other line of the file) last changed: each object stored
 *                     uses one, each token object destroyed gives one back; a call that needs more
 *                     room than is left answers CKR_DEVICE_MEMORY ("fails on the (N+1)th object").
 * A missing, unreadable or empty file means: plugged, no delay, no login or write failure.
 *
 * PC/SC mode (P11SHIM_PCSC_READER=<reader name>, read once with P11SHIM_CONTROL)
 *   The token is plugged only while a card is in that reader as pcscd reports it (asked through
 *   libpcsclite.so.1, dlopen'ed on first use, at every call as the control file is) *and* the
 *   control file does not say unplugged: pulling the card is an unplug, inserting it a replug,
 *   as a vendor library over a CCID reader behaves. pcscd not running, the reader missing or
 *   libpcsclite not loadable all count as no card. A card pulled and put back between two calls
 *   (pcscd's event counter for the reader moved) is a replug too.
 * Every call stats the file (~1 us); the file is re-read when its device, inode, size, mtime or
 * ctime changed, and also — while its mtime is within 2 s of the last read — re-read and compared
 * by content, so same-size rewrites within one timestamp tick are not missed. Replace the file
 * atomically (write a temporary file, rename it over): a truncate-then-write can be observed
 * half-way (an empty file reads as "plugged").
 *
 * Unplugged (every slot with state=unplugged, or no card in PC/SC mode; else the slots that
 * unplug_slot lists)
 *   C_OpenSession, C_GetTokenInfo, C_GetMechanismList, C_GetMechanismInfo, C_InitToken,
 *   C_Login                                    -> CKR_TOKEN_NOT_PRESENT
 *   every other call on a session (C_Sign*, C_Find*, C_GetAttributeValue, C_CreateObject,
 *   C_GenerateKeyPair, C_CloseSession, C_Logout, C_GetSessionInfo, ...) -> CKR_DEVICE_REMOVED
 *   C_GetSlotList(tokenPresent=TRUE) lists no slot (with unplug_slot: leaves those slots out);
 *   with FALSE it lists them all.
 *   C_GetSlotInfo clears CKF_TOKEN_PRESENT (with unplug_slot: for those slots).
 *   C_Initialize, C_Finalize, C_GetInfo, C_GetFunctionList, C_WaitForSlotEvent and
 *   C_CloseAllSessions are forwarded.
 * Replug (a call observes `plugged` after a call observed `unplugged`)
 *   Before that call proceeds (other threads wait), the target's C_CloseAllSessions runs on
 *   every slot (SoftHSM thereby logs the token out) once in-flight session calls have
 *   returned, and every session handle opened before is remembered as dead: calls on it answer
 *   CKR_SESSION_HANDLE_INVALID without being forwarded (C_CloseSession on it answers the same
 *   and forgets it), until the target hands out the same number for a new session.
 *   The state is only sampled at calls: an unplug/replug that no call observes does nothing.
 * Replug of one slot (a call observes slot N no longer in unplug_slot after a call observed it
 *   there, while state=unplugged was not observed by either)
 *   The same, for slot N alone: the target's C_CloseAllSessions(N) runs (SoftHSM logs that token
 *   out) and only the session handles of slot N opened before are remembered as dead; the other
 *   slots' sessions and logins are untouched. A slot still listed when state goes back to
 *   plugged stays unplugged (the replug above has closed its sessions too).
 *
 * C_Initialize's arguments (e.g. CKF_OS_LOCKING_OK) are forwarded unchanged. Thread-safe; no
 * output except one line on stderr when the target cannot be loaded. C_GetInterface is
 * deliberately not exported (a 2.40 module, like SoftHSM 2.6).
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <p11-kit/pkcs11.h>
#include <winscard.h>

#define DEFAULT_TARGET "/usr/lib/softhsm/libsofthsm2.so"
#define CTL_MAX 4096
#define MAX_DELAY_MS 600000UL
#define DELAY_SLICE_NS 5000000LL
#define RACY_WINDOW_NS 2000000000LL
#define MAX_HIDDEN 32
#define MAX_UNPLUG_SLOTS 8
#define MAX_SERIAL_SLOTS 16

static CK_FUNCTION_LIST g_list;

/* ---- target ---------------------------------------------------------------------------- */

static pthread_mutex_t g_load_lock = PTHREAD_MUTEX_INITIALIZER;
static CK_FUNCTION_LIST_PTR g_t; /* published once with release semantics, never changed */

/* ---- control file ---------------------------------------------------------------------- */

struct ctl_state {
    int unplugged;
    unsigned long delay_ms;
    int fail_login;
    int serial;
    unsigned long fail_create_class; /* fail_create_class: N + 1, 0 = off */
    unsigned long fail_set_class;    /* fail_set_class: N + 1, 0 = off */
    long watch_tid;                 /* watch_thread: 0 = off, -1 = the main thread, else a tid */
    char thread_log[256];           /* thread_log: where calls on the watched thread are noted */
    unsigned long max_sessions;     /* max_sessions: 0 = no cap */
    int no_copy;                    /* copy_object=0 */
    unsigned long max_objects;      /* max_objects: N + 1, 0 = off */
    unsigned long free_objects;     /* free_objects: N + 1, 0 = off */
    size_t n_hidden;                /* hide_mechanisms */
    CK_MECHANISM_TYPE hidden[MAX_HIDDEN];
    size_t n_unplug;                /* unplug_slot */
    CK_SLOT_ID unplug[MAX_UNPLUG_SLOTS];
    unsigned long gen;              /* bumped whenever the file's content changes */
};

static pthread_mutex_t g_ctl_lock = PTHREAD_MUTEX_INITIALIZER;
static char *g_ctl_path;              /* malloc'd, NULL = no control file */
static int g_ctl_cached;              /* the fields below describe the file */
static int g_ctl_exists;
static struct stat g_ctl_st;
static long long g_ctl_read_ns;       /* CLOCK_REALTIME of the last content read */
static char g_ctl_buf[CTL_MAX];
static size_t g_ctl_len;
static struct ctl_state g_cur;        /* parsed from g_ctl_buf */
static int g_seen_unplugged;          /* the state the previous call observed */
static size_t g_n_seen_slots;         /* unplug_slot as the previous call observed it */
static CK_SLOT_ID g_seen_slots[MAX_UNPLUG_SLOTS];
static unsigned long g_ctl_gen;       /* bumped at every change of the parsed content */

/* ---- PC/SC mode (all under g_ctl_lock) ------------------------------------------------- */

static char *g_reader;                /* P11SHIM_PCSC_READER, NULL = off */
static void *g_pcsc_dl;
static LONG (*p_establish)(DWORD, LPCVOID, LPCVOID, LPSCARDCONTEXT);
static LONG (*p_release)(SCARDCONTEXT);
static LONG (*p_status_change)(SCARDCONTEXT, DWORD, SCARD_READERSTATE *, DWORD);
static SCARDCONTEXT g_pcsc_ctx;
static int g_pcsc_have_ctx;
static DWORD g_card_events;           /* pcscd's event counter when the card was last seen */
static int g_card_seen;

/* ---- sessions -------------------------------------------------------------------------- */

/* Held for reading around every forwarded session call, for writing while a replug closes
 * all sessions in the target, so no target call runs on a session being torn down. */
static pthread_rwlock_t g_inflight;
static pthread_once_t g_inflight_once = PTHREAD_ONCE_INIT;

struct sess_ent {
    CK_SESSION_HANDLE h; /* 0 = empty (CK_INVALID_HANDLE) */
    CK_SLOT_ID slot;
    int dead;
};

static pthread_mutex_t g_sess_lock = PTHREAD_MUTEX_INITIALIZER;
/* max_sessions: held from the count of open sessions to the end of C_OpenSession. */
static pthread_mutex_t g_open_lock = PTHREAD_MUTEX_INITIALIZER;
/* max_objects / free_objects: held from the room check to the end of the storing call. */
static pthread_mutex_t g_store_lock = PTHREAD_MUTEX_INITIALIZER;
static unsigned long g_store_gen;  /* the control content g_store_used counts for */
static long g_store_used;          /* free_objects: objects stored (net) since that content */
static __thread int t_store_held;
/* serial=1: a slot's lock is held by its one signing call in progress (from its delay to its
 * return). Entries are added under g_serial_tab_lock and never removed; g_serial_lock serves
 * the slots beyond the table and sessions of unknown slot. */
struct serial_ent {
    CK_SLOT_ID slot;
    pthread_mutex_t lock;
};
static pthread_mutex_t g_serial_tab_lock = PTHREAD_MUTEX_INITIALIZER;
static struct serial_ent g_serial[MAX_SERIAL_SLOTS];
static size_t g_n_serial;
static pthread_mutex_t g_serial_lock = PTHREAD_MUTEX_INITIALIZER;
static __thread pthread_mutex_t *t_serial_held;
/* The control state sampled by this thread's current session call (set by session_enter). */
static __thread struct ctl_state t_call;
static struct sess_ent *g_tab; /* open addressing, linear probing */
static size_t g_cap, g_cnt;    /* g_cap is 0 or a power of two */

/* Lock order: a serial lock -> g_load_lock -> g_ctl_lock -> g_inflight -> g_open_lock /
 * g_store_lock -> g_sess_lock; g_serial_tab_lock is only held alone. No lock but a serial lock
 * is held while sleeping; g_inflight is never held while taking g_ctl_lock or a serial lock. */

static void inflight_init(void)
{
    pthread_rwlockattr_t a;
    pthread_rwlockattr_init(&a);
    /* Writer preference: a replug is not starved by a stream of session calls. */
    pthread_rwlockattr_setkind_np(&a, PTHREAD_RWLOCK_PREFER_WRITER_NONRECURSIVE_NP);
    pthread_rwlock_init(&g_inflight, &a);
    pthread_rwlockattr_destroy(&a);
}

static size_t sess_home(CK_SESSION_HANDLE h, size_t cap)
{
    return (size_t)(((uint64_t)h * 0x9E3779B97F4A7C15ULL) >> 32) & (cap - 1);
}

/* g_sess_lock held */
static struct sess_ent *sess_find(CK_SESSION_HANDLE h)
{
    if (g_cap == 0 || h == 0)
        return NULL;
    for (size_t i = sess_home(h, g_cap);; i = (i + 1) & (g_cap - 1)) {
        if (g_tab[i].h == h)
            return &g_tab[i];
        if (g_tab[i].h == 0)
            return NULL;
    }
}

/* the table has room */
static void sess_put_raw(struct sess_ent *tab, size_t cap, const struct sess_ent *e)
{
    size_t i = sess_home(e->h, cap);
    while (tab[i].h != 0 && tab[i].h != e->h)
        i = (i + 1) & (cap - 1);
    tab[i] = *e;
}

/* g_sess_lock held. Rebuild into `cap` slots, dropping the entries of `slot` if `drop`. */
static int sess_rebuild(size_t cap, int drop, CK_SLOT_ID slot)
{
    struct sess_ent *tab = calloc(cap, sizeof *tab);
    size_t cnt = 0;
    if (!tab)
        return -1;
    for (size_t i = 0; i < g_cap; i++) {
        if (g_tab[i].h == 0 || (drop && g_tab[i].slot == slot))
            continue;
        sess_put_raw(tab, cap, &g_tab[i]);
        cnt++;
    }
    free(g_tab);
    g_tab = tab;
    g_cap = cap;
    g_cnt = cnt;
    return 0;
}

/* g_sess_lock held */
static int sess_insert(CK_SESSION_HANDLE h, CK_SLOT_ID slot)
{
    struct sess_ent e = { h, slot, 0 };
    struct sess_ent *cur = sess_find(h);
    if (cur) {
        *cur = e; /* the target reused a number: the new session is alive */
        return 0;
    }
    if ((g_cnt + 1) * 2 > g_cap && sess_rebuild(g_cap ? g_cap * 2 : 64, 0, 0) != 0)
        return -1;
    sess_put_raw(g_tab, g_cap, &e);
    g_cnt++;
    return 0;
}

/* g_sess_lock held; deletion with backward shift (no tombstones) */
static void sess_remove(CK_SESSION_HANDLE h)
{
    struct sess_ent *e = sess_find(h);
    if (!e)
        return;
    size_t mask = g_cap - 1, i = (size_t)(e - g_tab), j = i;
    for (;;) {
        j = (j + 1) & mask;
        if (g_tab[j].h == 0)
            break;
        size_t k = sess_home(g_tab[j].h, g_cap);
        /* move the entry at j into the hole at i unless its home lies cyclically in (i, j] */
        int stays = (i <= j) ? (i < k && k <= j) : (i < k || k <= j);
        if (!stays) {
            g_tab[i] = g_tab[j];
            i = j;
        }
    }
    g_tab[i].h = 0;
    g_cnt--;
}

/* g_sess_lock not held. Sessions of `slot` open in the target (not dead). */
static unsigned long sess_count_live(CK_SLOT_ID slot)
{
    unsigned long n = 0;
    pthread_mutex_lock(&g_sess_lock);
    for (size_t i = 0; i < g_cap; i++)
        if (g_tab[i].h != 0 && !g_tab[i].dead && g_tab[i].slot == slot)
            n++;
    pthread_mutex_unlock(&g_sess_lock);
    return n;
}

/* g_sess_lock not held. The slot of session `h`: 1 and *slot, or 0 when the shim did not
 * open it. */
static int sess_slot(CK_SESSION_HANDLE h, CK_SLOT_ID *slot)
{
    pthread_mutex_lock(&g_sess_lock);
    struct sess_ent *e = sess_find(h);
    if (e)
        *slot = e->slot;
    pthread_mutex_unlock(&g_sess_lock);
    return e != NULL;
}

static void sess_clear(void)
{
    pthread_mutex_lock(&g_sess_lock);
    free(g_tab);
    g_tab = NULL;
    g_cap = g_cnt = 0;
    pthread_mutex_unlock(&g_sess_lock);
}

/* ---- loading --------------------------------------------------------------------------- */

/* g_load_lock held */
static void ctl_set_path_from_env(void)
{
    const char *p = getenv("P11SHIM_CONTROL");
    char *copy = (p && *p) ? strdup(p) : NULL;
    pthread_mutex_lock(&g_ctl_lock);
    int same = (copy == NULL && g_ctl_path == NULL) ||
               (copy && g_ctl_path && strcmp(copy, g_ctl_path) == 0);
    if (!same) {
        free(g_ctl_path);
        g_ctl_path = copy;
        copy = NULL;
        g_ctl_cached = 0;
        g_ctl_len = 0;
        memset(&g_cur, 0, sizeof g_cur);
        g_cur.gen = ++g_ctl_gen;
    }
    const char *r = getenv("P11SHIM_PCSC_READER");
    free(g_reader);
    g_reader = (r && *r) ? strdup(r) : NULL;
    pthread_mutex_unlock(&g_ctl_lock);
    free(copy);
}

static CK_FUNCTION_LIST_PTR load_target(void)
{
    CK_FUNCTION_LIST_PTR t = __atomic_load_n(&g_t, __ATOMIC_ACQUIRE);
    if (t)
        return t;
    pthread_once(&g_inflight_once, inflight_init);
    pthread_mutex_lock(&g_load_lock);
    t = g_t;
    if (!t) {
        const char *path = getenv("P11SHIM_TARGET");
        if (!path || !*path)
            path = DEFAULT_TARGET;
        void *dl = dlopen(path, RTLD_NOW | RTLD_LOCAL);
        if (!dl) {
            const char *err = dlerror();
            fprintf(stderr, "p11shim: cannot load the target PKCS#11 module %s (P11SHIM_TARGET): %s\n",
                    path, err ? err : "unknown error");
        } else {
            CK_C_GetFunctionList gfl = (CK_C_GetFunctionList)dlsym(dl, "C_GetFunctionList");
            CK_FUNCTION_LIST_PTR tl = NULL;
            if (!gfl || gfl(&tl) != CKR_OK || !tl) {
                fprintf(stderr, "p11shim: %s (P11SHIM_TARGET) has no usable C_GetFunctionList\n", path);
                dlclose(dl);
            } else if (tl == &g_list) {
                fprintf(stderr, "p11shim: P11SHIM_TARGET (%s) is the shim itself\n", path);
                dlclose(dl);
            } else {
                ctl_set_path_from_env();
                t = tl;
                __atomic_store_n(&g_t, t, __ATOMIC_RELEASE);
            }
        }
    }
    pthread_mutex_unlock(&g_load_lock);
    return t;
}

/* ---- control file ---------------------------------------------------------------------- */

static long long ts_ns(const struct timespec *ts)
{
    return (long long)ts->tv_sec * 1000000000LL + ts->tv_nsec;
}

static int ts_eq(const struct timespec *a, const struct timespec *b)
{
    return a->tv_sec == b->tv_sec && a->tv_nsec == b->tv_nsec;
}

static char *trim(char *s, char *end)
{
    while (s < end && (*s == ' ' || *s == '\t' || *s == '\r'))
        s++;
    while (end > s && (end[-1] == ' ' || end[-1] == '\t' || end[-1] == '\r'))
        end--;
    *end = '\0';
    return s;
}

static const struct {
    const char *name;
    CK_MECHANISM_TYPE type;
} g_mech_names[] = {
    { "CKM_ECDSA", CKM_ECDSA },
    { "CKM_ECDSA_SHA1", CKM_ECDSA_SHA1 },
    { "CKM_ECDSA_SHA224", CKM_ECDSA_SHA224 },
    { "CKM_ECDSA_SHA256", CKM_ECDSA_SHA256 },
    { "CKM_ECDSA_SHA384", CKM_ECDSA_SHA384 },
    { "CKM_ECDSA_SHA512", CKM_ECDSA_SHA512 },
    { "CKM_SHA256_HMAC", CKM_SHA256_HMAC },
    { "CKM_SHA384_HMAC", CKM_SHA384_HMAC },
    { "CKM_SHA512_HMAC", CKM_SHA512_HMAC },
    { "CKM_SHA256_RSA_PKCS", CKM_SHA256_RSA_PKCS },
    { "CKM_SHA256_RSA_PKCS_PSS", CKM_SHA256_RSA_PKCS_PSS },
    { "CKM_RSA_PKCS", CKM_RSA_PKCS },
    { "CKM_RSA_PKCS_PSS", CKM_RSA_PKCS_PSS },
};

static void hide_mechanism(struct ctl_state *out, CK_MECHANISM_TYPE m)
{
    for (size_t i = 0; i < out->n_hidden; i++)
        if (out->hidden[i] == m)
            return;
    if (out->n_hidden < MAX_HIDDEN)
        out->hidden[out->n_hidden++] = m;
}

/* hide_mechanisms=M[,M...]: numbers or names; bad entries ignored */
static void parse_mechanisms(char *val, struct ctl_state *out)
{
    char *save = NULL;
    for (char *tok = strtok_r(val, ",", &save); tok; tok = strtok_r(NULL, ",", &save)) {
        tok = trim(tok, tok + strlen(tok));
        if (!*tok)
            continue;
        char *e = NULL;
        errno = 0;
        unsigned long v = strtoul(tok, &e, 0);
        if (errno == 0 && e != tok && *e == '\0' && tok[0] != '-') {
            hide_mechanism(out, (CK_MECHANISM_TYPE)v);
            continue;
        }
        for (size_t i = 0; i < sizeof g_mech_names / sizeof g_mech_names[0]; i++)
            if (strcmp(tok, g_mech_names[i].name) == 0)
                hide_mechanism(out, g_mech_names[i].type);
    }
}

/* unplug_slot=N[,N...]: decimal slot ids; bad entries ignored */
static void parse_slots(char *val, struct ctl_state *out)
{
    char *save = NULL;
    for (char *tok = strtok_r(val, ",", &save); tok; tok = strtok_r(NULL, ",", &save)) {
        tok = trim(tok, tok + strlen(tok));
        char *e = NULL;
        errno = 0;
        unsigned long v = strtoul(tok, &e, 10);
        if (errno != 0 || e == tok || *e != '\0' || tok[0] == '-' || tok[0] == '+')
            continue;
        size_t i = 0;
        while (i < out->n_unplug && out->unplug[i] != (CK_SLOT_ID)v)
            i++;
        if (i == out->n_unplug && out->n_unplug < MAX_UNPLUG_SLOTS)
            out->unplug[out->n_unplug++] = (CK_SLOT_ID)v;
    }
}

static int slot_listed(const CK_SLOT_ID *slots, size_t n, CK_SLOT_ID slot)
{
    for (size_t i = 0; i < n; i++)
        if (slots[i] == slot)
            return 1;
    return 0;
}

/* The token in `slot` is unplugged: state=unplugged (or no card), or unplug_slot lists it. */
static int slot_unplugged(const struct ctl_state *s, CK_SLOT_ID slot)
{
    return s->unplugged || slot_listed(s->unplug, s->n_unplug, slot);
}

static int mechanism_hidden(const struct ctl_state *s, CK_MECHANISM_TYPE m)
{
    for (size_t i = 0; i < s->n_hidden; i++)
        if (s->hidden[i] == m)
            return 1;
    return 0;
}

static void ctl_parse(const char *buf, size_t len, struct ctl_state *out)
{
    char tmp[CTL_MAX + 1];
    int smartcard = 0, have_sessions = 0, have_copy = 0;
    memcpy(tmp, buf, len);
    tmp[len] = '\0';
    memset(out, 0, sizeof *out);
    char *line = tmp;
    while (line && *line) {
        char *nl = strchr(line, '\n');
        char *end = nl ? nl : line + strlen(line);
        char *eq = memchr(line, '=', (size_t)(end - line));
        if (eq) {
            char *key = trim(line, eq);
            char *val = trim(eq + 1, end);
            if (key[0] == '#') {
                /* a comment */
            } else if (strcmp(key, "state") == 0) {
                if (strcmp(val, "unplugged") == 0)
                    out->unplugged = 1;
                else if (strcmp(val, "plugged") == 0)
                    out->unplugged = 0;
            } else if (strcmp(key, "watch_thread") == 0) {
                if (strcmp(val, "main") == 0) {
                    out->watch_tid = -1;
                } else {
                    char *e = NULL;
                    long v = strtol(val, &e, 10);
                    if (e != val && *e == '\0' && v > 0)
                        out->watch_tid = v;
                }
            } else if (strcmp(key, "profile") == 0) {
                if (strcmp(val, "smartcard") == 0)
                    smartcard = 1;
                else if (strcmp(val, "none") == 0)
                    smartcard = 0;
            } else if (strcmp(key, "hide_mechanisms") == 0) {
                parse_mechanisms(val, out);
            } else if (strcmp(key, "unplug_slot") == 0) {
                parse_slots(val, out);
            } else if (strcmp(key, "max_sessions") == 0 || strcmp(key, "copy_object") == 0 ||
                       strcmp(key, "max_objects") == 0 || strcmp(key, "free_objects") == 0) {
                char *e = NULL;
                errno = 0;
                unsigned long v = strtoul(val, &e, 10);
                if (errno == 0 && e != val && *e == '\0' && val[0] != '-' && v < 1000000UL) {
                    if (strcmp(key, "max_sessions") == 0) {
                        out->max_sessions = v;
                        have_sessions = 1;
                    } else if (strcmp(key, "copy_object") == 0) {
                        out->no_copy = v == 0;
                        have_copy = 1;
                    } else if (strcmp(key, "max_objects") == 0) {
                        out->max_objects = v + 1;
                    } else {
                        out->free_objects = v + 1;
                    }
                }
            } else if (strcmp(key, "thread_log") == 0) {
                size_t n = strlen(val);
                if (n < sizeof out->thread_log)
                    memcpy(out->thread_log, val, n + 1);
            } else if (strcmp(key, "sign_delay_ms") == 0 || strcmp(key, "fail_login") == 0 ||
                       strcmp(key, "serial") == 0 || strcmp(key, "fail_create_class") == 0 ||
                       strcmp(key, "fail_set_class") == 0) {
                char *e = NULL;
                errno = 0;
                unsigned long v = strtoul(val, &e, 10);
                if (errno == 0 && e != val && *e == '\0' && val[0] != '-') {
                    if (strcmp(key, "sign_delay_ms") == 0)
                        out->delay_ms = v > MAX_DELAY_MS ? MAX_DELAY_MS : v;
                    else if (strcmp(key, "serial") == 0)
                        out->serial = v != 0;
                    else if (strcmp(key, "fail_create_class") == 0)
                        out->fail_create_class = v + 1;
                    else if (strcmp(key, "fail_set_class") == 0)
                        out->fail_set_class = v + 1;
                    else
                        out->fail_login = v != 0;
                }
            }
        }
        line = nl ? nl + 1 : NULL;
    }
    if (smartcard) {
        if (!have_sessions)
            out->max_sessions = 4;
        if (!have_copy)
            out->no_copy = 1;
        hide_mechanism(out, CKM_ECDSA_SHA1);
        hide_mechanism(out, CKM_ECDSA_SHA224);
        hide_mechanism(out, CKM_ECDSA_SHA256);
        hide_mechanism(out, CKM_ECDSA_SHA384);
        hide_mechanism(out, CKM_ECDSA_SHA512);
    }
}

/* g_ctl_lock held. Read the file; returns 1 when its content differs from the cached one. */
static int ctl_read(void)
{
    char buf[CTL_MAX];
    size_t len = 0;
    struct timespec now;
    clock_gettime(CLOCK_REALTIME, &now);
    int fd = open(g_ctl_path, O_RDONLY | O_CLOEXEC);
    if (fd >= 0) {
        while (len < sizeof buf) {
            ssize_t n = read(fd, buf + len, sizeof buf - len);
            if (n < 0 && errno == EINTR)
                continue;
            if (n <= 0)
                break;
            len += (size_t)n;
        }
        close(fd);
    }
    g_ctl_read_ns = ts_ns(&now);
    if (len == g_ctl_len && memcmp(buf, g_ctl_buf, len) == 0)
        return 0;
    memcpy(g_ctl_buf, buf, len);
    g_ctl_len = len;
    return 1;
}

static void replug_kill(void);
static void replug_kill_slot(CK_SLOT_ID slot);

/* g_ctl_lock held */
static int pcsc_load(void)
{
    if (p_status_change)
        return 1;
    if (!g_pcsc_dl)
        g_pcsc_dl = dlopen("libpcsclite.so.1", RTLD_NOW | RTLD_LOCAL);
    if (!g_pcsc_dl)
        return 0;
    p_establish = (LONG(*)(DWORD, LPCVOID, LPCVOID, LPSCARDCONTEXT))dlsym(g_pcsc_dl, "SCardEstablishContext");
    p_release = (LONG(*)(SCARDCONTEXT))dlsym(g_pcsc_dl, "SCardReleaseContext");
    p_status_change = (LONG(*)(SCARDCONTEXT, DWORD, SCARD_READERSTATE *, DWORD))dlsym(g_pcsc_dl, "SCardGetStatusChange");
    if (!p_establish || !p_release || !p_status_change) {
        p_status_change = NULL;
        return 0;
    }
    return 1;
}

/* g_ctl_lock held. 1 when a card is in g_reader; *swapped = it was pulled and put back since
 * the last call that saw it. */
static int pcsc_card_present(int *swapped)
{
    *swapped = 0;
    if (!pcsc_load())
        return 0;
    if (!g_pcsc_have_ctx) {
        if (p_establish(SCARD_SCOPE_SYSTEM, NULL, NULL, &g_pcsc_ctx) != SCARD_S_SUCCESS)
            return 0;
        g_pcsc_have_ctx = 1;
    }
    SCARD_READERSTATE rs;
    memset(&rs, 0, sizeof rs);
    rs.szReader = g_reader;
    rs.dwCurrentState = SCARD_STATE_UNAWARE;
    LONG rv = p_status_change(g_pcsc_ctx, 0, &rs, 1);
    if (rv != SCARD_S_SUCCESS) {
        if (rv != SCARD_E_UNKNOWN_READER && rv != SCARD_E_TIMEOUT) {
            /* pcscd went away (or the context did): start again at the next call */
            p_release(g_pcsc_ctx);
            g_pcsc_have_ctx = 0;
        }
        g_card_seen = 0;
        return 0;
    }
    int present = (rs.dwEventState & SCARD_STATE_PRESENT) &&
                  !(rs.dwEventState & (SCARD_STATE_MUTE | SCARD_STATE_UNAVAILABLE));
    DWORD events = rs.dwEventState >> 16;
    if (present && g_card_seen && events != g_card_events)
        *swapped = 1;
    g_card_seen = present;
    g_card_events = events;
    return present;
}

/* g_ctl_lock held. A call on the watched thread: one line "<function> <tid>" appended to the log. */
static void thread_note(const char *fn)
{
    if (!g_cur.watch_tid || !g_cur.thread_log[0] || strncmp(fn, "shim_", 5) != 0)
        return;
    long tid = (long)gettid();
    if (g_cur.watch_tid == -1 ? tid != (long)getpid() : tid != g_cur.watch_tid)
        return;
    int fd = open(g_cur.thread_log, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0600);
    if (fd < 0)
        return;
    char line[128];
    int n = snprintf(line, sizeof line, "%s %ld\n", fn + 5, tid);
    if (n > 0 && write(fd, line, (size_t)n) < 0) {
        /* nothing to do: the note is best effort */
    }
    close(fd);
}

/* Sample the control file and handle a replug; `out` gets the state in force for this call.
 * `fn` is the calling function's name (the refresh() macro passes it). */
static void refresh_named(struct ctl_state *out, const char *fn)
{
    pthread_mutex_lock(&g_ctl_lock);
    if (g_ctl_path) {
        struct stat st;
        int exists = stat(g_ctl_path, &st) == 0;
        int changed = !g_ctl_cached || exists != g_ctl_exists;
        if (!changed && exists)
            changed = st.st_dev != g_ctl_st.st_dev || st.st_ino != g_ctl_st.st_ino ||
                      st.st_size != g_ctl_st.st_size || !ts_eq(&st.st_mtim, &g_ctl_st.st_mtim) ||
                      !ts_eq(&st.st_ctim, &g_ctl_st.st_ctim);
        /* A rewrite in the same timestamp tick as our last read keeps mtime (and maybe size). */
        int racy = exists && !changed && g_ctl_read_ns <= ts_ns(&st.st_mtim) + RACY_WINDOW_NS;
        if (changed || racy) {
            int differs;
            if (exists) {
                g_ctl_st = st;
                differs = ctl_read();
            } else {
                differs = g_ctl_len != 0 || !g_ctl_cached;
                g_ctl_len = 0;
            }
            g_ctl_exists = exists;
            g_ctl_cached = 1;
            if (differs) {
                ctl_parse(g_ctl_buf, g_ctl_len, &g_cur);
                g_cur.gen = ++g_ctl_gen;
            }
        }
    }
    int unplugged = g_cur.unplugged, swapped = 0;
    if (!unplugged && g_reader)
        unplugged = !pcsc_card_present(&swapped);
    if ((g_seen_unplugged || swapped) && !unplugged) {
        replug_kill();
    } else if (!unplugged) {
        /* unplug_slot: the slots no longer listed are back (a global replug covers them all) */
        for (size_t i = 0; i < g_n_seen_slots; i++)
            if (!slot_listed(g_cur.unplug, g_cur.n_unplug, g_seen_slots[i]))
                replug_kill_slot(g_seen_slots[i]);
    }
    g_seen_unplugged = unplugged;
    g_n_seen_slots = g_cur.n_unplug;
    memcpy(g_seen_slots, g_cur.unplug, g_cur.n_unplug * sizeof *g_seen_slots);
    thread_note(fn);
    *out = g_cur;
    out->unplugged = unplugged;
    pthread_mutex_unlock(&g_ctl_lock);
}

/* g_ctl_lock held: the token is back; the sessions from before are gone, and the login. */
static void replug_kill(void)
{
    CK_FUNCTION_LIST_PTR t = __atomic_load_n(&g_t, __ATOMIC_ACQUIRE);
    pthread_rwlock_wrlock(&g_inflight);
    pthread_mutex_lock(&g_sess_lock);
    for (size_t i = 0; i < g_cap; i++)
        if (g_tab[i].h != 0)
            g_tab[i].dead = 1;
    pthread_mutex_unlock(&g_sess_lock);
    if (t) {
        CK_SLOT_ID stack_slots[64];
        CK_SLOT_ID *slots = stack_slots;
        CK_ULONG n = 0;
        if (t->C_GetSlotList(CK_FALSE, NULL, &n) == CKR_OK && n > 0) {
            if (n > 64)
                slots = malloc(n * sizeof *slots);
            if (slots && t->C_GetSlotList(CK_FALSE, slots, &n) == CKR_OK)
                for (CK_ULONG i = 0; i < n; i++)
                    t->C_CloseAllSessions(slots[i]);
            if (slots != stack_slots)
                free(slots);
        }
    }
    pthread_rwlock_unlock(&g_inflight);
}

/* g_ctl_lock held: the token in `slot` is back; its sessions from before are gone, and its
 * login. The other slots' sessions are untouched. */
static void replug_kill_slot(CK_SLOT_ID slot)
{
    CK_FUNCTION_LIST_PTR t = __atomic_load_n(&g_t, __ATOMIC_ACQUIRE);
    pthread_rwlock_wrlock(&g_inflight);
    pthread_mutex_lock(&g_sess_lock);
    for (size_t i = 0; i < g_cap; i++)
        if (g_tab[i].h != 0 && g_tab[i].slot == slot)
            g_tab[i].dead = 1;
    pthread_mutex_unlock(&g_sess_lock);
    if (t)
        t->C_CloseAllSessions(slot);
    pthread_rwlock_unlock(&g_inflight);
}

/* ---- helpers for forwarded calls ------------------------------------------------------- */

static long long mono_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts_ns(&ts);
}

static void sleep_ns(long long ns)
{
    struct timespec ts = { (time_t)(ns / 1000000000LL), (long)(ns % 1000000000LL) };
    while (nanosleep(&ts, &ts) != 0 && errno == EINTR) {
    }
}

enum { ENTER_PLAIN = 0, ENTER_DELAY = 1, ENTER_LOGIN = 2, ENTER_CLOSE = 4 };

#define refresh(out) refresh_named((out), __func__)

static void serial_release(void);
static CK_RV session_enter_locked(CK_SESSION_HANDLE h, int mode, struct ctl_state *sp, int known,
                                  CK_SLOT_ID slot);

/* serial=1: the lock of `slot` (known = 0: a session of unknown slot). */
static pthread_mutex_t *serial_lock_for(int known, CK_SLOT_ID slot)
{
    pthread_mutex_t *m = &g_serial_lock;
    if (!known)
        return m;
    pthread_mutex_lock(&g_serial_tab_lock);
    size_t i = 0;
    while (i < g_n_serial && g_serial[i].slot != slot)
        i++;
    if (i == g_n_serial && g_n_serial < MAX_SERIAL_SLOTS) {
        g_serial[i].slot = slot;
        pthread_mutex_init(&g_serial[i].lock, NULL);
        g_n_serial++;
    }
    if (i < g_n_serial)
        m = &g_serial[i].lock;
    pthread_mutex_unlock(&g_serial_tab_lock);
    return m;
}

#define session_enter(h, mode) session_enter_named((h), (mode), __func__)

/* Before a call on session `h`. On CKR_OK the caller holds g_inflight for reading and calls
 * session_leave() after forwarding. */
static CK_RV session_enter_named(CK_SESSION_HANDLE h, int mode, const char *fn)
{
    struct ctl_state s;
    if (!__atomic_load_n(&g_t, __ATOMIC_ACQUIRE))
        return CKR_CRYPTOKI_NOT_INITIALIZED;
    refresh_named(&s, fn);
    t_call = s;
    if (s.unplugged)
        return (mode & ENTER_LOGIN) ? CKR_TOKEN_NOT_PRESENT : CKR_DEVICE_REMOVED;
    CK_SLOT_ID slot = 0;
    int known = sess_slot(h, &slot);
    if (known && slot_unplugged(&s, slot))
        return (mode & ENTER_LOGIN) ? CKR_TOKEN_NOT_PRESENT : CKR_DEVICE_REMOVED;
    if ((mode & ENTER_DELAY) && s.serial) {
        pthread_mutex_t *m = serial_lock_for(known, slot);
        pthread_mutex_lock(m);
        t_serial_held = m;
    }
    CK_RV rv = session_enter_locked(h, mode, &s, known, slot);
    if (rv != CKR_OK)
        serial_release();
    return rv;
}

static void serial_release(void)
{
    if (t_serial_held) {
        pthread_mutex_t *m = t_serial_held;
        t_serial_held = NULL;
        pthread_mutex_unlock(m);
    }
}

/* session_enter, after the serial lock (if any) is taken. */
static CK_RV session_enter_locked(CK_SESSION_HANDLE h, int mode, struct ctl_state *sp, int known,
                                  CK_SLOT_ID slot)
{
    struct ctl_state s = *sp;
    if ((mode & ENTER_DELAY) && s.delay_ms > 0) {
        /* at least the full delay, measured on CLOCK_MONOTONIC */
        long long end = mono_ns() + (long long)s.delay_ms * 1000000LL;
        for (;;) {
            long long left = end - mono_ns();
            if (left <= 0)
                break;
            sleep_ns(left < DELAY_SLICE_NS ? left : DELAY_SLICE_NS);
            refresh(&s);
            if (s.unplugged || (known && slot_unplugged(&s, slot)))
                return CKR_DEVICE_REMOVED;
        }
    }
    pthread_rwlock_rdlock(&g_inflight);
    pthread_mutex_lock(&g_sess_lock);
    struct sess_ent *e = sess_find(h);
    int dead = e && e->dead;
    if (dead && (mode & ENTER_CLOSE))
        sess_remove(h);
    pthread_mutex_unlock(&g_sess_lock);
    if (dead) {
        pthread_rwlock_unlock(&g_inflight);
        return CKR_SESSION_HANDLE_INVALID;
    }
    if ((mode & ENTER_LOGIN) && s.fail_login) {
        pthread_rwlock_unlock(&g_inflight);
        return CKR_PIN_INCORRECT;
    }
    return CKR_OK;
}

static void session_leave(void)
{
    pthread_rwlock_unlock(&g_inflight);
    serial_release();
}

/* A call on a session: unplugged -> DEVICE_REMOVED, dead -> SESSION_HANDLE_INVALID. */
#define SESSION_FN(name, mode, params, args)                                              \
    static CK_RV shim_##name params                                                       \
    {                                                                                     \
        CK_RV rv = session_enter(hSession, (mode));                                       \
        if (rv != CKR_OK)                                                                 \
            return rv;                                                                    \
        rv = g_t->name ? g_t->name args : CKR_FUNCTION_NOT_SUPPORTED;                     \
        session_leave();                                                                  \
        return rv;                                                                        \
    }

/* Signing: slowed down by sign_delay_ms, except for a length query (NULL output). */
#define SIGN_FN(name, params, args, outbuf)                                               \
    static CK_RV shim_##name params                                                       \
    {                                                                                     \
        CK_RV rv = session_enter(hSession, (outbuf) != NULL ? ENTER_DELAY : ENTER_PLAIN); \
        if (rv != CKR_OK)                                                                 \
            return rv;                                                                    \
        rv = g_t->name ? g_t->name args : CKR_FUNCTION_NOT_SUPPORTED;                     \
        session_leave();                                                                  \
        return rv;                                                                        \
    }

/* A call taking a mechanism: a hidden one (hide_mechanisms) -> CKR_MECHANISM_INVALID. */
#define MECH_FN(name, params, args)                                                       \
    static CK_RV shim_##name params                                                       \
    {                                                                                     \
        CK_RV rv = session_enter(hSession, ENTER_PLAIN);                                  \
        if (rv != CKR_OK)                                                                 \
            return rv;                                                                    \
        if (pMechanism && mechanism_hidden(&t_call, pMechanism->mechanism))               \
            rv = CKR_MECHANISM_INVALID;                                                   \
        else                                                                              \
            rv = g_t->name ? g_t->name args : CKR_FUNCTION_NOT_SUPPORTED;                 \
        session_leave();                                                                  \
        return rv;                                                                        \
    }

/* A call taking a mechanism that stores `need` token objects: hidden mechanism ->
 * CKR_MECHANISM_INVALID, no room in the store (max_objects, free_objects) -> CKR_DEVICE_MEMORY. */
#define STORE_FN(name, need, params, args)                                                \
    static CK_RV shim_##name params                                                       \
    {                                                                                     \
        CK_RV rv = session_enter(hSession, ENTER_PLAIN);                                  \
        if (rv != CKR_OK)                                                                 \
            return rv;                                                                    \
        unsigned long need_ = (need);                                                     \
        if (pMechanism && mechanism_hidden(&t_call, pMechanism->mechanism))               \
            rv = CKR_MECHANISM_INVALID;                                                   \
        else if ((rv = store_enter(hSession, need_)) == CKR_OK)                           \
            rv = g_t->name ? g_t->name args : CKR_FUNCTION_NOT_SUPPORTED;                 \
        store_leave(rv == CKR_OK ? (long)need_ : 0);                                      \
        session_leave();                                                                  \
        return rv;                                                                        \
    }

/* A slot call that needs the token: unplugged (that slot) -> TOKEN_NOT_PRESENT. */
#define TOKEN_FN(name, params, args)                                                      \
    static CK_RV shim_##name params                                                       \
    {                                                                                     \
        struct ctl_state s;                                                               \
        CK_FUNCTION_LIST_PTR t = __atomic_load_n(&g_t, __ATOMIC_ACQUIRE);                 \
        if (!t)                                                                           \
            return CKR_CRYPTOKI_NOT_INITIALIZED;                                          \
        refresh(&s);                                                                      \
        if (slot_unplugged(&s, slotID))                                                   \
            return CKR_TOKEN_NOT_PRESENT;                                                 \
        return t->name ? t->name args : CKR_FUNCTION_NOT_SUPPORTED;                       \
    }

/* ---- general purpose ------------------------------------------------------------------- */

static CK_RV shim_C_Initialize(CK_VOID_PTR pInitArgs)
{
    struct ctl_state s;
    CK_FUNCTION_LIST_PTR t = load_target();
    if (!t)
        return CKR_GENERAL_ERROR;
    pthread_mutex_lock(&g_load_lock);
    ctl_set_path_from_env();
    pthread_mutex_unlock(&g_load_lock);
    refresh(&s);
    CK_RV rv = t->C_Initialize(pInitArgs);
    if (rv == CKR_OK)
        sess_clear();
    return rv;
}

static CK_RV shim_C_Finalize(CK_VOID_PTR pReserved)
{
    struct ctl_state s;
    CK_FUNCTION_LIST_PTR t = __atomic_load_n(&g_t, __ATOMIC_ACQUIRE);
    if (!t)
        return CKR_CRYPTOKI_NOT_INITIALIZED;
    refresh(&s);
    CK_RV rv = t->C_Finalize(pReserved);
    if (rv == CKR_OK)
        sess_clear();
    return rv;
}

static CK_RV shim_C_GetInfo(CK_INFO_PTR pInfo)
{
    struct ctl_state s;
    CK_FUNCTION_LIST_PTR t = __atomic_load_n(&g_t, __ATOMIC_ACQUIRE);
    if (!t)
        return CKR_CRYPTOKI_NOT_INITIALIZED;
    refresh(&s);
    return t->C_GetInfo(pInfo);
}

static CK_RV shim_C_GetFunctionList(CK_FUNCTION_LIST_PTR_PTR ppFunctionList)
{
    if (!ppFunctionList)
        return CKR_ARGUMENTS_BAD;
    if (!load_target())
        return CKR_GENERAL_ERROR;
    *ppFunctionList = &g_list;
    return CKR_OK;
}

/* ---- slots and tokens ------------------------------------------------------------------ */

static CK_RV shim_C_GetSlotList(CK_BBOOL tokenPresent, CK_SLOT_ID_PTR pSlotList,
                                CK_ULONG_PTR pulCount)
{
    struct ctl_state s;
    CK_FUNCTION_LIST_PTR t = __atomic_load_n(&g_t, __ATOMIC_ACQUIRE);
    if (!t)
        return CKR_CRYPTOKI_NOT_INITIALIZED;
    refresh(&s);
    if (s.unplugged && tokenPresent) {
        CK_ULONG n = 0;
        if (!pulCount)
            return CKR_ARGUMENTS_BAD;
        CK_RV rv = t->C_GetSlotList(tokenPresent, NULL, &n); /* the target's own errors */
        if (rv == CKR_OK)
            *pulCount = 0;
        return rv;
    }
    if (s.n_unplug == 0 || !tokenPresent)
        return t->C_GetSlotList(tokenPresent, pSlotList, pulCount);
    /* unplug_slot: the target's list without those slots */
    if (!pulCount)
        return CKR_ARGUMENTS_BAD;
    CK_SLOT_ID *all = NULL;
    CK_ULONG n = 0;
    CK_RV rv;
    for (int tries = 0;; tries++) { /* a slot may appear between the two calls */
        rv = t->C_GetSlotList(tokenPresent, NULL, &n);
        if (rv != CKR_OK)
            return rv;
        CK_SLOT_ID *grown = realloc(all, (n ? n : 1) * sizeof *all);
        if (!grown) {
            free(all);
            return CKR_HOST_MEMORY;
        }
        all = grown;
        rv = t->C_GetSlotList(tokenPresent, all, &n);
        if (rv != CKR_BUFFER_TOO_SMALL || tries == 8)
            break;
    }
    if (rv == CKR_OK) {
        CK_ULONG k = 0;
        for (CK_ULONG i = 0; i < n; i++)
            if (!slot_listed(s.unplug, s.n_unplug, all[i]))
                all[k++] = all[i];
        if (pSlotList && *pulCount < k)
            rv = CKR_BUFFER_TOO_SMALL;
        else if (pSlotList)
            memcpy(pSlotList, all, k * sizeof *all);
        *pulCount = k;
    }
    free(all);
    return rv;
}

static CK_RV shim_C_GetSlotInfo(CK_SLOT_ID slotID, CK_SLOT_INFO_PTR pInfo)
{
    struct ctl_state s;
    CK_FUNCTION_LIST_PTR t = __atomic_load_n(&g_t, __ATOMIC_ACQUIRE);
    if (!t)
        return CKR_CRYPTOKI_NOT_INITIALIZED;
    refresh(&s);
    CK_RV rv = t->C_GetSlotInfo(slotID, pInfo);
    if (rv == CKR_OK && slot_unplugged(&s, slotID) && pInfo)
        pInfo->flags &= ~(CK_FLAGS)CKF_TOKEN_PRESENT;
    return rv;
}

static CK_RV shim_C_WaitForSlotEvent(CK_FLAGS flags, CK_SLOT_ID_PTR pSlot, CK_VOID_PTR pReserved)
{
    struct ctl_state s;
    CK_FUNCTION_LIST_PTR t = __atomic_load_n(&g_t, __ATOMIC_ACQUIRE);
    if (!t)
        return CKR_CRYPTOKI_NOT_INITIALIZED;
    refresh(&s);
    return t->C_WaitForSlotEvent(flags, pSlot, pReserved);
}

/* max_sessions: the token says so, as a card does (ulMaxSessionCount, ulSessionCount). */
static CK_RV shim_C_GetTokenInfo(CK_SLOT_ID slotID, CK_TOKEN_INFO_PTR pInfo)
{
    struct ctl_state s;
    CK_FUNCTION_LIST_PTR t = __atomic_load_n(&g_t, __ATOMIC_ACQUIRE);
    if (!t)
        return CKR_CRYPTOKI_NOT_INITIALIZED;
    refresh(&s);
    if (slot_unplugged(&s, slotID))
        return CKR_TOKEN_NOT_PRESENT;
    CK_RV rv = t->C_GetTokenInfo(slotID, pInfo);
    if (rv == CKR_OK && pInfo && s.max_sessions) {
        pInfo->ulMaxSessionCount = pInfo->ulMaxRwSessionCount = s.max_sessions;
        pInfo->ulSessionCount = sess_count_live(slotID);
        pInfo->ulRwSessionCount = CK_UNAVAILABLE_INFORMATION;
    }
    return rv;
}

/* The target's list without the hidden mechanisms (hide_mechanisms, profile=smartcard). */
static CK_RV shim_C_GetMechanismList(CK_SLOT_ID slotID, CK_MECHANISM_TYPE_PTR pMechanismList,
                                     CK_ULONG_PTR pulCount)
{
    struct ctl_state s;
    CK_FUNCTION_LIST_PTR t = __atomic_load_n(&g_t, __ATOMIC_ACQUIRE);
    if (!t)
        return CKR_CRYPTOKI_NOT_INITIALIZED;
    refresh(&s);
    if (slot_unplugged(&s, slotID))
        return CKR_TOKEN_NOT_PRESENT;
    if (s.n_hidden == 0)
        return t->C_GetMechanismList(slotID, pMechanismList, pulCount);
    if (!pulCount)
        return CKR_ARGUMENTS_BAD;
    CK_ULONG n = 0;
    CK_RV rv = t->C_GetMechanismList(slotID, NULL, &n);
    if (rv != CKR_OK)
        return rv;
    CK_MECHANISM_TYPE *all = malloc((n ? n : 1) * sizeof *all);
    if (!all)
        return CKR_HOST_MEMORY;
    rv = t->C_GetMechanismList(slotID, all, &n);
    if (rv == CKR_OK) {
        CK_ULONG k = 0;
        for (CK_ULONG i = 0; i < n; i++)
            if (!mechanism_hidden(&s, all[i]))
                all[k++] = all[i];
        if (pMechanismList && *pulCount < k) {
            rv = CKR_BUFFER_TOO_SMALL;
        } else if (pMechanismList) {
            memcpy(pMechanismList, all, k * sizeof *all);
        }
        *pulCount = k;
    }
    free(all);
    return rv;
}

static CK_RV shim_C_GetMechanismInfo(CK_SLOT_ID slotID, CK_MECHANISM_TYPE type,
                                     CK_MECHANISM_INFO_PTR pInfo)
{
    struct ctl_state s;
    CK_FUNCTION_LIST_PTR t = __atomic_load_n(&g_t, __ATOMIC_ACQUIRE);
    if (!t)
        return CKR_CRYPTOKI_NOT_INITIALIZED;
    refresh(&s);
    if (slot_unplugged(&s, slotID))
        return CKR_TOKEN_NOT_PRESENT;
    if (mechanism_hidden(&s, type))
        return CKR_MECHANISM_INVALID;
    return t->C_GetMechanismInfo(slotID, type, pInfo);
}

TOKEN_FN(C_InitToken,
         (CK_SLOT_ID slotID, CK_UTF8CHAR_PTR pPin, CK_ULONG ulPinLen, CK_UTF8CHAR_PTR pLabel),
         (slotID, pPin, ulPinLen, pLabel))
SESSION_FN(C_InitPIN, ENTER_PLAIN, (CK_SESSION_HANDLE hSession, CK_UTF8CHAR_PTR pPin, CK_ULONG ulPinLen),
           (hSession, pPin, ulPinLen))
SESSION_FN(C_SetPIN, ENTER_PLAIN,
           (CK_SESSION_HANDLE hSession, CK_UTF8CHAR_PTR pOldPin, CK_ULONG ulOldLen,
            CK_UTF8CHAR_PTR pNewPin, CK_ULONG ulNewLen),
           (hSession, pOldPin, ulOldLen, pNewPin, ulNewLen))

/* ---- sessions -------------------------------------------------------------------------- */

static CK_RV shim_C_OpenSession(CK_SLOT_ID slotID, CK_FLAGS flags, CK_VOID_PTR pApplication,
                                CK_NOTIFY Notify, CK_SESSION_HANDLE_PTR phSession)
{
    struct ctl_state s;
    CK_FUNCTION_LIST_PTR t = __atomic_load_n(&g_t, __ATOMIC_ACQUIRE);
    if (!t)
        return CKR_CRYPTOKI_NOT_INITIALIZED;
    refresh(&s);
    if (slot_unplugged(&s, slotID))
        return CKR_TOKEN_NOT_PRESENT;
    pthread_rwlock_rdlock(&g_inflight);
    /* max_sessions: the count and the open are one step, so concurrent opens cannot overshoot */
    if (s.max_sessions)
        pthread_mutex_lock(&g_open_lock);
    CK_RV rv = CKR_OK;
    if (s.max_sessions && sess_count_live(slotID) >= s.max_sessions)
        rv = CKR_SESSION_COUNT;
    else
        rv = t->C_OpenSession(slotID, flags, pApplication, Notify, phSession);
    if (rv == CKR_OK && phSession) {
        pthread_mutex_lock(&g_sess_lock);
        int bad = sess_insert(*phSession, slotID);
        pthread_mutex_unlock(&g_sess_lock);
        if (bad) {
            t->C_CloseSession(*phSession);
            *phSession = 0;
            rv = CKR_HOST_MEMORY;
        }
    }
    if (s.max_sessions)
        pthread_mutex_unlock(&g_open_lock);
    pthread_rwlock_unlock(&g_inflight);
    return rv;
}

static CK_RV shim_C_CloseSession(CK_SESSION_HANDLE hSession)
{
    CK_RV rv = session_enter(hSession, ENTER_CLOSE);
    if (rv != CKR_OK)
        return rv;
    rv = g_t->C_CloseSession(hSession);
    if (rv == CKR_OK || rv == CKR_SESSION_HANDLE_INVALID) {
        pthread_mutex_lock(&g_sess_lock);
        sess_remove(hSession);
        pthread_mutex_unlock(&g_sess_lock);
    }
    session_leave();
    return rv;
}

static CK_RV shim_C_CloseAllSessions(CK_SLOT_ID slotID)
{
    struct ctl_state s;
    CK_FUNCTION_LIST_PTR t = __atomic_load_n(&g_t, __ATOMIC_ACQUIRE);
    if (!t)
        return CKR_CRYPTOKI_NOT_INITIALIZED;
    refresh(&s);
    pthread_rwlock_rdlock(&g_inflight);
    CK_RV rv = t->C_CloseAllSessions(slotID);
    if (rv == CKR_OK) {
        pthread_mutex_lock(&g_sess_lock);
        if (g_cap)
            sess_rebuild(g_cap, 1, slotID); /* out of memory: the entries stay; harmless */
        pthread_mutex_unlock(&g_sess_lock);
    }
    pthread_rwlock_unlock(&g_inflight);
    return rv;
}

SESSION_FN(C_GetSessionInfo, ENTER_PLAIN, (CK_SESSION_HANDLE hSession, CK_SESSION_INFO_PTR pInfo),
           (hSession, pInfo))
SESSION_FN(C_GetOperationState, ENTER_PLAIN,
           (CK_SESSION_HANDLE hSession, CK_BYTE_PTR pOperationState, CK_ULONG_PTR pulOperationStateLen),
           (hSession, pOperationState, pulOperationStateLen))
SESSION_FN(C_SetOperationState, ENTER_PLAIN,
           (CK_SESSION_HANDLE hSession, CK_BYTE_PTR pOperationState, CK_ULONG ulOperationStateLen,
            CK_OBJECT_HANDLE hEncryptionKey, CK_OBJECT_HANDLE hAuthenticationKey),
           (hSession, pOperationState, ulOperationStateLen, hEncryptionKey, hAuthenticationKey))
SESSION_FN(C_Login, ENTER_LOGIN,
           (CK_SESSION_HANDLE hSession, CK_USER_TYPE userType, CK_UTF8CHAR_PTR pPin, CK_ULONG ulPinLen),
           (hSession, userType, pPin, ulPinLen))
SESSION_FN(C_Logout, ENTER_PLAIN, (CK_SESSION_HANDLE hSession), (hSession))

/* ---- objects --------------------------------------------------------------------------- */

/* CKA_CLASS in a template, or -1 when it has none. */
static long template_class(CK_ATTRIBUTE_PTR tpl, CK_ULONG n)
{
    for (CK_ULONG i = 0; tpl && i < n; i++)
        if (tpl[i].type == CKA_CLASS && tpl[i].pValue && tpl[i].ulValueLen == sizeof(CK_OBJECT_CLASS))
            return (long)*(CK_OBJECT_CLASS *)tpl[i].pValue;
    return -1;
}

/* CKA_CLASS of an object, or -1 when it cannot be read. */
static long object_class(CK_SESSION_HANDLE h, CK_OBJECT_HANDLE o)
{
    CK_OBJECT_CLASS c = 0;
    CK_ATTRIBUTE a = { CKA_CLASS, &c, sizeof c };
    return g_t->C_GetAttributeValue(h, o, &a, 1) == CKR_OK ? (long)c : -1;
}

/* A write refused with CKR_DEVICE_MEMORY, without forwarding, when the control field `fault`
 * (a CKA_CLASS + 1, 0 = off) names the class `cls` evaluates to; else forwarded. */
#define WRITE_FAULT_FN(name, fault, cls, params, args)                                    \
    static CK_RV shim_##name params                                                       \
    {                                                                                     \
        CK_RV rv = session_enter(hSession, ENTER_PLAIN);                                  \
        if (rv != CKR_OK)                                                                 \
            return rv;                                                                    \
        unsigned long fail = t_call.fault;                                                \
        if (fail != 0 && (cls) == (long)(fail - 1))                                       \
            rv = CKR_DEVICE_MEMORY;                                                       \
        else                                                                              \
            rv = g_t->name ? g_t->name args : CKR_FUNCTION_NOT_SUPPORTED;                 \
        session_leave();                                                                  \
        return rv;                                                                        \
    }

/* ---- a small object store (max_objects, free_objects) ---------------------------------- */

/* CKA_TOKEN in a template: 1 true, 0 false, -1 absent. */
static int template_token(CK_ATTRIBUTE_PTR tpl, CK_ULONG n)
{
    for (CK_ULONG i = 0; tpl && i < n; i++)
        if (tpl[i].type == CKA_TOKEN && tpl[i].pValue && tpl[i].ulValueLen == sizeof(CK_BBOOL))
            return *(CK_BBOOL *)tpl[i].pValue ? 1 : 0;
    return -1;
}

/* CKA_TOKEN of an object: 1 true, 0 false or unreadable. */
static int object_token(CK_SESSION_HANDLE h, CK_OBJECT_HANDLE o)
{
    CK_BBOOL v = CK_FALSE;
    CK_ATTRIBUTE a = { CKA_TOKEN, &v, sizeof v };
    return g_t->C_GetAttributeValue(h, o, &a, 1) == CKR_OK && v ? 1 : 0;
}

/* The token objects on the token of session `h`, counted by a session of their own (this
 * process's login applies to it); -1 when they cannot be counted. */
static long count_token_objects(CK_SESSION_HANDLE h)
{
    CK_SESSION_INFO info;
    CK_SESSION_HANDLE c;
    if (g_t->C_GetSessionInfo(h, &info) != CKR_OK ||
        g_t->C_OpenSession(info.slotID, CKF_SERIAL_SESSION, NULL, NULL, &c) != CKR_OK)
        return -1;
    CK_BBOOL yes = CK_TRUE;
    CK_ATTRIBUTE a = { CKA_TOKEN, &yes, sizeof yes };
    long n = -1;
    if (g_t->C_FindObjectsInit(c, &a, 1) == CKR_OK) {
        CK_OBJECT_HANDLE buf[64];
        CK_ULONG got = 0;
        CK_RV rv;
        n = 0;
        while ((rv = g_t->C_FindObjects(c, buf, 64, &got)) == CKR_OK && got > 0)
            n += (long)got;
        if (rv != CKR_OK)
            n = -1;
        g_t->C_FindObjectsFinal(c);
    }
    g_t->C_CloseSession(c);
    return n;
}

/* Inside session_enter/leave, before a call that stores `need` token objects: CKR_OK (then
 * store_leave() after the call) or CKR_DEVICE_MEMORY when the store has no room for them. */
static CK_RV store_enter(CK_SESSION_HANDLE h, unsigned long need)
{
    const struct ctl_state *s = &t_call;
    if (!s->max_objects && !s->free_objects)
        return CKR_OK;
    pthread_mutex_lock(&g_store_lock);
    t_store_held = 1;
    if (g_store_gen != s->gen) {
        g_store_gen = s->gen;
        g_store_used = 0;
    }
    if (need == 0)
        return CKR_OK;
    if (s->free_objects && g_store_used + (long)need > (long)(s->free_objects - 1))
        return CKR_DEVICE_MEMORY;
    if (s->max_objects) {
        long n = count_token_objects(h);
        if (n >= 0 && n + (long)need > (long)(s->max_objects - 1))
            return CKR_DEVICE_MEMORY;
    }
    return CKR_OK;
}

/* After the call store_enter admitted (or refused): `stored` token objects were added. */
static void store_leave(long stored)
{
    if (!t_store_held)
        return;
    g_store_used += stored;
    t_store_held = 0;
    pthread_mutex_unlock(&g_store_lock);
}

static CK_RV shim_C_CreateObject(CK_SESSION_HANDLE hSession, CK_ATTRIBUTE_PTR pTemplate,
                                 CK_ULONG ulCount, CK_OBJECT_HANDLE_PTR phObject)
{
    CK_RV rv = session_enter(hSession, ENTER_PLAIN);
    if (rv != CKR_OK)
        return rv;
    unsigned long fail = t_call.fail_create_class;
    unsigned long need = template_token(pTemplate, ulCount) == 1;
    if (fail != 0 && template_class(pTemplate, ulCount) == (long)(fail - 1))
        rv = CKR_DEVICE_MEMORY;
    else if ((rv = store_enter(hSession, need)) == CKR_OK)
        rv = g_t->C_CreateObject(hSession, pTemplate, ulCount, phObject);
    store_leave(rv == CKR_OK ? (long)need : 0);
    session_leave();
    return rv;
}

static CK_RV shim_C_CopyObject(CK_SESSION_HANDLE hSession, CK_OBJECT_HANDLE hObject,
                               CK_ATTRIBUTE_PTR pTemplate, CK_ULONG ulCount,
                               CK_OBJECT_HANDLE_PTR phNewObject)
{
    CK_RV rv = session_enter(hSession, ENTER_PLAIN);
    if (rv != CKR_OK)
        return rv;
    if (t_call.no_copy) {
        session_leave();
        return CKR_FUNCTION_NOT_SUPPORTED;
    }
    int tok = template_token(pTemplate, ulCount);
    unsigned long need = tok == 1 || (tok == -1 && object_token(hSession, hObject));
    if ((rv = store_enter(hSession, need)) == CKR_OK)
        rv = g_t->C_CopyObject(hSession, hObject, pTemplate, ulCount, phNewObject);
    store_leave(rv == CKR_OK ? (long)need : 0);
    session_leave();
    return rv;
}

static CK_RV shim_C_DestroyObject(CK_SESSION_HANDLE hSession, CK_OBJECT_HANDLE hObject)
{
    CK_RV rv = session_enter(hSession, ENTER_PLAIN);
    if (rv != CKR_OK)
        return rv;
    int tok = t_call.free_objects ? object_token(hSession, hObject) : 0;
    store_enter(hSession, 0);
    rv = g_t->C_DestroyObject(hSession, hObject);
    store_leave(rv == CKR_OK && tok ? -1 : 0);
    session_leave();
    return rv;
}
SESSION_FN(C_GetObjectSize, ENTER_PLAIN,
           (CK_SESSION_HANDLE hSession, CK_OBJECT_HANDLE hObject, CK_ULONG_PTR pulSize),
           (hSession, hObject, pulSize))
SESSION_FN(C_GetAttributeValue, ENTER_PLAIN,
           (CK_SESSION_HANDLE hSession, CK_OBJECT_HANDLE hObject, CK_ATTRIBUTE_PTR pTemplate,
            CK_ULONG ulCount),
           (hSession, hObject, pTemplate, ulCount))
WRITE_FAULT_FN(C_SetAttributeValue, fail_set_class, object_class(hSession, hObject),
               (CK_SESSION_HANDLE hSession, CK_OBJECT_HANDLE hObject, CK_ATTRIBUTE_PTR pTemplate,
                CK_ULONG ulCount),
               (hSession, hObject, pTemplate, ulCount))
SESSION_FN(C_FindObjectsInit, ENTER_PLAIN,
           (CK_SESSION_HANDLE hSession, CK_ATTRIBUTE_PTR pTemplate, CK_ULONG ulCount),
           (hSession, pTemplate, ulCount))
SESSION_FN(C_FindObjects, ENTER_PLAIN,
           (CK_SESSION_HANDLE hSession, CK_OBJECT_HANDLE_PTR phObject, CK_ULONG ulMaxObjectCount,
            CK_ULONG_PTR pulObjectCount),
           (hSession, phObject, ulMaxObjectCount, pulObjectCount))
SESSION_FN(C_FindObjectsFinal, ENTER_PLAIN, (CK_SESSION_HANDLE hSession), (hSession))

/* ---- encryption, decryption, digests --------------------------------------------------- */

MECH_FN(C_EncryptInit,
        (CK_SESSION_HANDLE hSession, CK_MECHANISM_PTR pMechanism, CK_OBJECT_HANDLE hKey),
        (hSession, pMechanism, hKey))
SESSION_FN(C_Encrypt, ENTER_PLAIN,
           (CK_SESSION_HANDLE hSession, CK_BYTE_PTR pData, CK_ULONG ulDataLen,
            CK_BYTE_PTR pEncryptedData, CK_ULONG_PTR pulEncryptedDataLen),
           (hSession, pData, ulDataLen, pEncryptedData, pulEncryptedDataLen))
SESSION_FN(C_EncryptUpdate, ENTER_PLAIN,
           (CK_SESSION_HANDLE hSession, CK_BYTE_PTR pPart, CK_ULONG ulPartLen,
            CK_BYTE_PTR pEncryptedPart, CK_ULONG_PTR pulEncryptedPartLen),
           (hSession, pPart, ulPartLen, pEncryptedPart, pulEncryptedPartLen))
SESSION_FN(C_EncryptFinal, ENTER_PLAIN,
           (CK_SESSION_HANDLE hSession, CK_BYTE_PTR pLastEncryptedPart,
            CK_ULONG_PTR pulLastEncryptedPartLen),
           (hSession, pLastEncryptedPart, pulLastEncryptedPartLen))
MECH_FN(C_DecryptInit,
        (CK_SESSION_HANDLE hSession, CK_MECHANISM_PTR pMechanism, CK_OBJECT_HANDLE hKey),
        (hSession, pMechanism, hKey))
SESSION_FN(C_Decrypt, ENTER_PLAIN,
           (CK_SESSION_HANDLE hSession, CK_BYTE_PTR pEncryptedData, CK_ULONG ulEncryptedDataLen,
            CK_BYTE_PTR pData, CK_ULONG_PTR pulDataLen),
           (hSession, pEncryptedData, ulEncryptedDataLen, pData, pulDataLen))
SESSION_FN(C_DecryptUpdate, ENTER_PLAIN,
           (CK_SESSION_HANDLE hSession, CK_BYTE_PTR pEncryptedPart, CK_ULONG ulEncryptedPartLen,
            CK_BYTE_PTR pPart, CK_ULONG_PTR pulPartLen),
           (hSession, pEncryptedPart, ulEncryptedPartLen, pPart, pulPartLen))
SESSION_FN(C_DecryptFinal, ENTER_PLAIN,
           (CK_SESSION_HANDLE hSession, CK_BYTE_PTR pLastPart, CK_ULONG_PTR pulLastPartLen),
           (hSession, pLastPart, pulLastPartLen))
MECH_FN(C_DigestInit, (CK_SESSION_HANDLE hSession, CK_MECHANISM_PTR pMechanism),
        (hSession, pMechanism))
SESSION_FN(C_Digest, ENTER_PLAIN,
           (CK_SESSION_HANDLE hSession, CK_BYTE_PTR pData, CK_ULONG ulDataLen, CK_BYTE_PTR pDigest,
            CK_ULONG_PTR pulDigestLen),
           (hSession, pData, ulDataLen, pDigest, pulDigestLen))
SESSION_FN(C_DigestUpdate, ENTER_PLAIN,
           (CK_SESSION_HANDLE hSession, CK_BYTE_PTR pPart, CK_ULONG ulPartLen),
           (hSession, pPart, ulPartLen))
SESSION_FN(C_DigestKey, ENTER_PLAIN, (CK_SESSION_HANDLE hSession, CK_OBJECT_HANDLE hKey),
           (hSession, hKey))
SESSION_FN(C_DigestFinal, ENTER_PLAIN,
           (CK_SESSION_HANDLE hSession, CK_BYTE_PTR pDigest, CK_ULONG_PTR pulDigestLen),
           (hSession, pDigest, pulDigestLen))

/* ---- signing and verifying ------------------------------------------------------------- */

MECH_FN(C_SignInit,
        (CK_SESSION_HANDLE hSession, CK_MECHANISM_PTR pMechanism, CK_OBJECT_HANDLE hKey),
        (hSession, pMechanism, hKey))
SIGN_FN(C_Sign,
        (CK_SESSION_HANDLE hSession, CK_BYTE_PTR pData, CK_ULONG ulDataLen, CK_BYTE_PTR pSignature,
         CK_ULONG_PTR pulSignatureLen),
        (hSession, pData, ulDataLen, pSignature, pulSignatureLen), pSignature)
SESSION_FN(C_SignUpdate, ENTER_DELAY,
           (CK_SESSION_HANDLE hSession, CK_BYTE_PTR pPart, CK_ULONG ulPartLen),
           (hSession, pPart, ulPartLen))
SIGN_FN(C_SignFinal,
        (CK_SESSION_HANDLE hSession, CK_BYTE_PTR pSignature, CK_ULONG_PTR pulSignatureLen),
        (hSession, pSignature, pulSignatureLen), pSignature)
MECH_FN(C_SignRecoverInit,
        (CK_SESSION_HANDLE hSession, CK_MECHANISM_PTR pMechanism, CK_OBJECT_HANDLE hKey),
        (hSession, pMechanism, hKey))
SESSION_FN(C_SignRecover, ENTER_PLAIN,
           (CK_SESSION_HANDLE hSession, CK_BYTE_PTR pData, CK_ULONG ulDataLen,
            CK_BYTE_PTR pSignature, CK_ULONG_PTR pulSignatureLen),
           (hSession, pData, ulDataLen, pSignature, pulSignatureLen))
MECH_FN(C_VerifyInit,
        (CK_SESSION_HANDLE hSession, CK_MECHANISM_PTR pMechanism, CK_OBJECT_HANDLE hKey),
        (hSession, pMechanism, hKey))
SESSION_FN(C_Verify, ENTER_PLAIN,
           (CK_SESSION_HANDLE hSession, CK_BYTE_PTR pData, CK_ULONG ulDataLen,
            CK_BYTE_PTR pSignature, CK_ULONG ulSignatureLen),
           (hSession, pData, ulDataLen, pSignature, ulSignatureLen))
SESSION_FN(C_VerifyUpdate, ENTER_PLAIN,
           (CK_SESSION_HANDLE hSession, CK_BYTE_PTR pPart, CK_ULONG ulPartLen),
           (hSession, pPart, ulPartLen))
SESSION_FN(C_VerifyFinal, ENTER_PLAIN,
           (CK_SESSION_HANDLE hSession, CK_BYTE_PTR pSignature, CK_ULONG ulSignatureLen),
           (hSession, pSignature, ulSignatureLen))
MECH_FN(C_VerifyRecoverInit,
        (CK_SESSION_HANDLE hSession, CK_MECHANISM_PTR pMechanism, CK_OBJECT_HANDLE hKey),
        (hSession, pMechanism, hKey))
SESSION_FN(C_VerifyRecover, ENTER_PLAIN,
           (CK_SESSION_HANDLE hSession, CK_BYTE_PTR pSignature, CK_ULONG ulSignatureLen,
            CK_BYTE_PTR pData, CK_ULONG_PTR pulDataLen),
           (hSession, pSignature, ulSignatureLen, pData, pulDataLen))

/* ---- dual-function --------------------------------------------------------------------- */

SESSION_FN(C_DigestEncryptUpdate, ENTER_PLAIN,
           (CK_SESSION_HANDLE hSession, CK_BYTE_PTR pPart, CK_ULONG ulPartLen,
            CK_BYTE_PTR pEncryptedPart, CK_ULONG_PTR pulEncryptedPartLen),
           (hSession, pPart, ulPartLen, pEncryptedPart, pulEncryptedPartLen))
SESSION_FN(C_DecryptDigestUpdate, ENTER_PLAIN,
           (CK_SESSION_HANDLE hSession, CK_BYTE_PTR pEncryptedPart, CK_ULONG ulEncryptedPartLen,
            CK_BYTE_PTR pPart, CK_ULONG_PTR pulPartLen),
           (hSession, pEncryptedPart, ulEncryptedPartLen, pPart, pulPartLen))
SESSION_FN(C_SignEncryptUpdate, ENTER_PLAIN,
           (CK_SESSION_HANDLE hSession, CK_BYTE_PTR pPart, CK_ULONG ulPartLen,
            CK_BYTE_PTR pEncryptedPart, CK_ULONG_PTR pulEncryptedPartLen),
           (hSession, pPart, ulPartLen, pEncryptedPart, pulEncryptedPartLen))
SESSION_FN(C_DecryptVerifyUpdate, ENTER_PLAIN,
           (CK_SESSION_HANDLE hSession, CK_BYTE_PTR pEncryptedPart, CK_ULONG ulEncryptedPartLen,
            CK_BYTE_PTR pPart, CK_ULONG_PTR pulPartLen),
           (hSession, pEncryptedPart, ulEncryptedPartLen, pPart, pulPartLen))

/* ---- keys and random numbers ----------------------------------------------------------- */

STORE_FN(C_GenerateKey, template_token(pTemplate, ulCount) == 1,
         (CK_SESSION_HANDLE hSession, CK_MECHANISM_PTR pMechanism, CK_ATTRIBUTE_PTR pTemplate,
          CK_ULONG ulCount, CK_OBJECT_HANDLE_PTR phKey),
         (hSession, pMechanism, pTemplate, ulCount, phKey))
STORE_FN(C_GenerateKeyPair,
         (unsigned long)(template_token(pPublicKeyTemplate, ulPublicKeyAttributeCount) == 1) +
             (unsigned long)(template_token(pPrivateKeyTemplate, ulPrivateKeyAttributeCount) == 1),
         (CK_SESSION_HANDLE hSession, CK_MECHANISM_PTR pMechanism,
          CK_ATTRIBUTE_PTR pPublicKeyTemplate, CK_ULONG ulPublicKeyAttributeCount,
          CK_ATTRIBUTE_PTR pPrivateKeyTemplate, CK_ULONG ulPrivateKeyAttributeCount,
          CK_OBJECT_HANDLE_PTR phPublicKey, CK_OBJECT_HANDLE_PTR phPrivateKey),
         (hSession, pMechanism, pPublicKeyTemplate, ulPublicKeyAttributeCount,
          pPrivateKeyTemplate, ulPrivateKeyAttributeCount, phPublicKey, phPrivateKey))
MECH_FN(C_WrapKey,
        (CK_SESSION_HANDLE hSession, CK_MECHANISM_PTR pMechanism, CK_OBJECT_HANDLE hWrappingKey,
         CK_OBJECT_HANDLE hKey, CK_BYTE_PTR pWrappedKey, CK_ULONG_PTR pulWrappedKeyLen),
        (hSession, pMechanism, hWrappingKey, hKey, pWrappedKey, pulWrappedKeyLen))
STORE_FN(C_UnwrapKey, template_token(pTemplate, ulAttributeCount) == 1,
         (CK_SESSION_HANDLE hSession, CK_MECHANISM_PTR pMechanism,
          CK_OBJECT_HANDLE hUnwrappingKey, CK_BYTE_PTR pWrappedKey, CK_ULONG ulWrappedKeyLen,
          CK_ATTRIBUTE_PTR pTemplate, CK_ULONG ulAttributeCount, CK_OBJECT_HANDLE_PTR phKey),
         (hSession, pMechanism, hUnwrappingKey, pWrappedKey, ulWrappedKeyLen, pTemplate,
          ulAttributeCount, phKey))
STORE_FN(C_DeriveKey, template_token(pTemplate, ulAttributeCount) == 1,
         (CK_SESSION_HANDLE hSession, CK_MECHANISM_PTR pMechanism, CK_OBJECT_HANDLE hBaseKey,
          CK_ATTRIBUTE_PTR pTemplate, CK_ULONG ulAttributeCount, CK_OBJECT_HANDLE_PTR phKey),
         (hSession, pMechanism, hBaseKey, pTemplate, ulAttributeCount, phKey))
SESSION_FN(C_SeedRandom, ENTER_PLAIN,
           (CK_SESSION_HANDLE hSession, CK_BYTE_PTR pSeed, CK_ULONG ulSeedLen),
           (hSession, pSeed, ulSeedLen))
SESSION_FN(C_GenerateRandom, ENTER_PLAIN,
           (CK_SESSION_HANDLE hSession, CK_BYTE_PTR RandomData, CK_ULONG ulRandomLen),
           (hSession, RandomData, ulRandomLen))
SESSION_FN(C_GetFunctionStatus, ENTER_PLAIN, (CK_SESSION_HANDLE hSession), (hSession))
SESSION_FN(C_CancelFunction, ENTER_PLAIN, (CK_SESSION_HANDLE hSession), (hSession))

/* ---- the function list and the exported symbols ---------------------------------------- */

#define ENTRY(name) .name = shim_##name

static CK_FUNCTION_LIST g_list = {
    .version = { 2, 40 },
    ENTRY(C_Initialize), ENTRY(C_Finalize), ENTRY(C_GetInfo), ENTRY(C_GetFunctionList),
    ENTRY(C_GetSlotList), ENTRY(C_GetSlotInfo), ENTRY(C_GetTokenInfo),
    ENTRY(C_GetMechanismList), ENTRY(C_GetMechanismInfo), ENTRY(C_InitToken), ENTRY(C_InitPIN),
    ENTRY(C_SetPIN), ENTRY(C_OpenSession), ENTRY(C_CloseSession), ENTRY(C_CloseAllSessions),
    ENTRY(C_GetSessionInfo), ENTRY(C_GetOperationState), ENTRY(C_SetOperationState),
    ENTRY(C_Login), ENTRY(C_Logout), ENTRY(C_CreateObject), ENTRY(C_CopyObject),
    ENTRY(C_DestroyObject), ENTRY(C_GetObjectSize), ENTRY(C_GetAttributeValue),
    ENTRY(C_SetAttributeValue), ENTRY(C_FindObjectsInit), ENTRY(C_FindObjects),
    ENTRY(C_FindObjectsFinal), ENTRY(C_EncryptInit), ENTRY(C_Encrypt), ENTRY(C_EncryptUpdate),
    ENTRY(C_EncryptFinal), ENTRY(C_DecryptInit), ENTRY(C_Decrypt), ENTRY(C_DecryptUpdate),
    ENTRY(C_DecryptFinal), ENTRY(C_DigestInit), ENTRY(C_Digest), ENTRY(C_DigestUpdate),
    ENTRY(C_DigestKey), ENTRY(C_DigestFinal), ENTRY(C_SignInit), ENTRY(C_Sign),
    ENTRY(C_SignUpdate), ENTRY(C_SignFinal), ENTRY(C_SignRecoverInit), ENTRY(C_SignRecover),
    ENTRY(C_VerifyInit), ENTRY(C_Verify), ENTRY(C_VerifyUpdate), ENTRY(C_VerifyFinal),
    ENTRY(C_VerifyRecoverInit), ENTRY(C_VerifyRecover), ENTRY(C_DigestEncryptUpdate),
    ENTRY(C_DecryptDigestUpdate), ENTRY(C_SignEncryptUpdate), ENTRY(C_DecryptVerifyUpdate),
    ENTRY(C_GenerateKey), ENTRY(C_GenerateKeyPair), ENTRY(C_WrapKey), ENTRY(C_UnwrapKey),
    ENTRY(C_DeriveKey), ENTRY(C_SeedRandom), ENTRY(C_GenerateRandom),
    ENTRY(C_GetFunctionStatus), ENTRY(C_CancelFunction), ENTRY(C_WaitForSlotEvent),
};

/* The plain C_* symbols, as aliases. The function list points at the static functions, so no
 * other module's exported C_* can be bound in their place. */
#define EXPORT(name) \
    extern __typeof__(shim_##name) name __attribute__((alias("shim_" #name), visibility("default")));

EXPORT(C_Initialize) EXPORT(C_Finalize) EXPORT(C_GetInfo) EXPORT(C_GetFunctionList)
EXPORT(C_GetSlotList) EXPORT(C_GetSlotInfo) EXPORT(C_GetTokenInfo) EXPORT(C_GetMechanismList)
EXPORT(C_GetMechanismInfo) EXPORT(C_InitToken) EXPORT(C_InitPIN) EXPORT(C_SetPIN)
EXPORT(C_OpenSession) EXPORT(C_CloseSession) EXPORT(C_CloseAllSessions) EXPORT(C_GetSessionInfo)
EXPORT(C_GetOperationState) EXPORT(C_SetOperationState) EXPORT(C_Login) EXPORT(C_Logout)
EXPORT(C_CreateObject) EXPORT(C_CopyObject) EXPORT(C_DestroyObject) EXPORT(C_GetObjectSize)
EXPORT(C_GetAttributeValue) EXPORT(C_SetAttributeValue) EXPORT(C_FindObjectsInit)
EXPORT(C_FindObjects) EXPORT(C_FindObjectsFinal) EXPORT(C_EncryptInit) EXPORT(C_Encrypt)
EXPORT(C_EncryptUpdate) EXPORT(C_EncryptFinal) EXPORT(C_DecryptInit) EXPORT(C_Decrypt)
EXPORT(C_DecryptUpdate) EXPORT(C_DecryptFinal) EXPORT(C_DigestInit) EXPORT(C_Digest)
EXPORT(C_DigestUpdate) EXPORT(C_DigestKey) EXPORT(C_DigestFinal) EXPORT(C_SignInit)
EXPORT(C_Sign) EXPORT(C_SignUpdate) EXPORT(C_SignFinal) EXPORT(C_SignRecoverInit)
EXPORT(C_SignRecover) EXPORT(C_VerifyInit) EXPORT(C_Verify) EXPORT(C_VerifyUpdate)
EXPORT(C_VerifyFinal) EXPORT(C_VerifyRecoverInit) EXPORT(C_VerifyRecover)
EXPORT(C_DigestEncryptUpdate) EXPORT(C_DecryptDigestUpdate) EXPORT(C_SignEncryptUpdate)
EXPORT(C_DecryptVerifyUpdate) EXPORT(C_GenerateKey) EXPORT(C_GenerateKeyPair) EXPORT(C_WrapKey)
EXPORT(C_UnwrapKey) EXPORT(C_DeriveKey) EXPORT(C_SeedRandom) EXPORT(C_GenerateRandom)
EXPORT(C_GetFunctionStatus) EXPORT(C_CancelFunction) EXPORT(C_WaitForSlotEvent)

/* Free what the shim allocated if it is ever unloaded. The target stays loaded: unloading a
 * module that may still be initialised is not safe. */
__attribute__((destructor)) static void shim_fini(void)
{
    sess_clear();
    pthread_mutex_lock(&g_ctl_lock);
    free(g_ctl_path);
    g_ctl_path = NULL;
    pthread_mutex_unlock(&g_ctl_lock);
}
