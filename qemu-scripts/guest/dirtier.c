/*
 * dirtier: a freestanding multiboot guest that dirties guest RAM at a known rate and
 * checks that RAM still holds what it wrote. Used by qmpshadow's tests and benchmarks.
 *
 * Loop c (c = 0, 1, 2, ...): for i in [0, N): slot = (c*N + i) mod R; first verify that the
 * page of that slot still holds what loop c - R/N wrote there (header + body), count a
 * mismatch otherwise; then overwrite it with the contents for (c, slot). The loop counter
 * and the mismatch count live in guest RAM (.bss), so they survive pause/resume and live
 * migration. See docs/test-guest.md.
 *
 * Optional disk writes (dslots=S, dchunk=K sectors): loop c also writes one chunk of K
 * sectors to slot c mod S of the first IDE disk (ATA PIO, LBA28, from LBA 0), after
 * reading it back and checking that it still holds what loop c - S wrote (disk
 * mismatches are counted separately and printed as dmism= on the COUNTER line).
 */
#include <stddef.h>
#include <stdint.h>

#include "lib.h"

#define PAGE_SIZE 4096u
#define REGION_BASE 0x00800000u /* 8 MiB: above the kernel image and the multiboot info */
#define PAGE_MAGIC 0x54524944u  /* bytes "DIRT" */
#define HDR_WORDS 4u            /* magic, slot, counter lo, counter hi */
#define HDR_SIZE (HDR_WORDS * 4u)
#define BODY_SIZE (PAGE_SIZE - HDR_SIZE)
#define PAGE_WORDS (PAGE_SIZE / 4u)

#define MB_BOOT_MAGIC 0x2BADB002u
#define MB_INFO_MEMORY 0x001u
#define MB_INFO_CMDLINE 0x004u

#define PIT_HZ 1193182u
#define CAL_MS 10u
#define MAX_MISMATCH_REPORTS 16u

enum pattern { PAT_REPEAT, PAT_TEXT, PAT_RANDOM };
static const char *const pattern_names[] = {"repeat", "text", "random"};

struct multiboot_info {
    uint32_t flags;
    uint32_t mem_lower;
    uint32_t mem_upper;
    uint32_t boot_device;
    uint32_t cmdline;
};

struct fault_frame {
    uint32_t edi, esi, ebp, esp, ebx, edx, ecx, eax;
    uint32_t vector, error;
    uint32_t eip, cs, eflags;
};

/* ---- configuration (from the command line) ---- */
static uint32_t cfg_pages = 16;     /* N: pages dirtied per loop */
static uint32_t cfg_region_mib = 16;
static uint32_t cfg_delay_us = 1000;
static uint32_t cfg_print_ms = 100;
static enum pattern cfg_pattern = PAT_TEXT;

/* ---- derived ---- */
static uint32_t region_slots;       /* R: a multiple of N */
static uint32_t region_blocks;      /* K = R / N: loops per full rotation */
static uint8_t *region;
static uint32_t tsc_khz;
static uint64_t delay_ticks;
static uint64_t print_ticks;

/* ---- disk (ATA PIO on the primary IDE bus) ---- */
#define ATA_DATA 0x1F0u
#define ATA_COUNT 0x1F2u
#define ATA_LBA0 0x1F3u
#define ATA_LBA1 0x1F4u
#define ATA_LBA2 0x1F5u
#define ATA_DRIVE 0x1F6u
#define ATA_CMD 0x1F7u
#define ATA_CTRL 0x3F6u
#define ATA_BSY 0x80u
#define ATA_DRQ 0x08u
#define ATA_ERR 0x01u
#define ATA_DF 0x20u
#define DISK_MAGIC 0x4b534944u /* bytes "DISK" */
#define MAX_DCHUNK 64u         /* sectors: 32 KiB */
static uint32_t cfg_dslots = 0; /* 0: no disk writes */
static uint32_t cfg_dchunk = 8;
static uint32_t disk_ok;
static volatile uint64_t disk_mismatches;
static volatile uint64_t disk_errors;
static uint32_t disk_reports;
static uint8_t dbuf[MAX_DCHUNK * 512u] __attribute__((aligned(16)));
static uint8_t dwant[MAX_DCHUNK * 512u] __attribute__((aligned(16)));

/* ---- the state that must survive pause/resume and migration: plain guest RAM ---- */
static volatile uint64_t loop_counter;  /* loops completed */
static volatile uint64_t mismatches;    /* pages found not holding what was written */
static uint32_t mismatch_reports;

static char cmdline_copy[1024];
static uint8_t scratch[PAGE_SIZE] __attribute__((aligned(16)));

#define CORPUS_SIZE 65536u
static char corpus[CORPUS_SIZE];

/* ---- hashing ---- */
static inline uint32_t fmix32(uint32_t h)
{
    h ^= h >> 16;
    h *= 0x85ebca6bu;
    h ^= h >> 13;
    h *= 0xc2b2ae35u;
    h ^= h >> 16;
    return h;
}

static inline uint32_t mix3(uint32_t a, uint32_t b, uint32_t c)
{
    return fmix32(a * 0x9e3779b1u ^ fmix32(b ^ 0x7f4a7c15u) ^ fmix32(c + 0x165667b1u));
}

static inline uint32_t xorshift32(uint32_t *s)
{
    uint32_t x = *s;
    x ^= x << 13;
    x ^= x >> 17;
    x ^= x << 5;
    *s = x;
    return x;
}

/* ---- text pattern ---- */
static const char *const words[] = {
    "the",       "a",        "of",        "and",      "to",        "in",       "is",
    "page",      "memory",   "dirty",     "guest",    "host",      "shadow",   "replica",
    "migration", "stream",   "epoch",     "commit",   "checkpoint", "device",  "state",
    "qemu",      "kernel",   "virtual",   "machine",  "primary",   "failover", "lease",
    "heartbeat", "frame",    "delta",     "bitmap",   "socket",    "queue",    "buffer",
    "cache",     "block",    "sector",    "write",    "read",      "copy",     "flush",
    "sync",      "pause",    "resume",    "running",  "stopped",   "network",  "packet",
    "latency",   "bandwidth", "throughput", "sample", "value",     "counter",  "region",
    "slot",      "header",   "magic",     "pattern",  "random",    "text",     "repeat",
    "lorem",     "ipsum",    "dolor",     "sit",      "amet",      "quick",    "brown",
    "fox",       "jumps",    "over",      "lazy",     "dog",       "river",    "mountain",
    "winter",    "summer",   "morning",   "evening",  "coffee",    "table",    "window",
};
#define NWORDS (sizeof words / sizeof words[0])

/* A fixed 64 KiB corpus of word salad; a text page is a slot-chosen window of it. */
static void build_corpus(void)
{
    uint32_t seed = 0x2545F491u;
    uint32_t pos = 0, col = 0;
    int capital = 1;
    while (pos < CORPUS_SIZE) {
        const char *w = words[xorshift32(&seed) % NWORDS];
        for (uint32_t k = 0; w[k] && pos < CORPUS_SIZE; k++, col++) {
            char ch = w[k];
            if (capital && k == 0 && ch >= 'a' && ch <= 'z')
                ch = (char)(ch - 'a' + 'A');
            corpus[pos++] = ch;
        }
        capital = 0;
        uint32_t r = xorshift32(&seed) % 16;
        if (r == 0 && pos < CORPUS_SIZE) {
            corpus[pos++] = '.';
            capital = 1;
            col++;
        } else if (r == 1 && pos < CORPUS_SIZE) {
            corpus[pos++] = ',';
            col++;
        }
        if (pos < CORPUS_SIZE) {
            if (col >= 72) {
                corpus[pos++] = '\n';
                col = 0;
            } else {
                corpus[pos++] = ' ';
                col++;
            }
        }
    }
}

/* Writes the decimal value of v, zero-padded to 20 digits, at dst. */
static void stamp_u64(char *dst, uint64_t v)
{
    for (int i = 19; i >= 0; i--) {
        uint32_t digit;
        v = udiv64_32(v, 10, &digit);
        dst[i] = (char)('0' + digit);
    }
}

#define STAMPS 4u
#define STAMP_LEN 24u /* "rev " + 20 digits */

static void fill_text(uint8_t *page, uint64_t c, uint32_t slot)
{
    char *body = (char *)page + HDR_SIZE;
    uint32_t off = (fmix32(slot ^ 0x9e3779b9u) % (CORPUS_SIZE - BODY_SIZE)) & ~3u;
    char stamp[STAMP_LEN];
    memcpy(body, corpus + off, BODY_SIZE);
    /* the counter in decimal at a few slot-chosen places */
    memcpy(stamp, "rev ", 4);
    stamp_u64(stamp + 4, c);
    for (uint32_t k = 0; k < STAMPS; k++) {
        uint32_t p = mix3(slot, k, 0x51ed270bu) % (BODY_SIZE - STAMP_LEN);
        memcpy(body + p, stamp, STAMP_LEN);
    }
    /* one small edit whose place and letters depend on (c, slot) */
    uint32_t h = mix3((uint32_t)c, (uint32_t)(c >> 32), slot ^ 0x5bd1e995u);
    uint32_t p = h % (BODY_SIZE - 8);
    uint32_t s = h | 1u;
    for (uint32_t k = 0; k < 8; k++)
        body[p + k] = (char)('A' + xorshift32(&s) % 26);
}

/* ---- page contents ---- */
static void fill_page(uint8_t *page, uint64_t c, uint32_t slot)
{
    uint32_t *w = (uint32_t *)page;
    w[0] = PAGE_MAGIC;
    w[1] = slot;
    w[2] = (uint32_t)c;
    w[3] = (uint32_t)(c >> 32);
    uint32_t v = mix3((uint32_t)c, (uint32_t)(c >> 32), slot);
    switch (cfg_pattern) {
    case PAT_REPEAT:
        for (uint32_t i = HDR_WORDS; i < PAGE_WORDS; i++)
            w[i] = v;
        break;
    case PAT_RANDOM: {
        uint32_t s = v ? v : 0x6d2b79f5u;
        for (uint32_t i = HDR_WORDS; i < PAGE_WORDS; i++)
            w[i] = xorshift32(&s);
        break;
    }
    case PAT_TEXT:
        fill_text(page, c, slot);
        break;
    }
}

static void report_mismatch(uint32_t slot, uint64_t expect_c, const uint32_t *got,
                            uint32_t first_bad)
{
    mismatches = mismatches + 1;
    if (mismatch_reports >= MAX_MISMATCH_REPORTS)
        return;
    mismatch_reports++;
    uint64_t got_c = ((uint64_t)got[3] << 32) | got[2];
    kprintf("MISMATCH slot=%u addr=0x%x expect_counter=%llu got_magic=0x%08x got_slot=%u "
            "got_counter=%llu first_bad=%u\n",
            slot, (uint32_t)(uintptr_t)got, expect_c, got[0], got[1], got_c, first_bad);
}

/* Checks that the page of `slot` holds exactly what loop `expect_c` wrote there. */
static void verify_page(const uint8_t *page, uint64_t expect_c, uint32_t slot)
{
    const uint32_t *got = (const uint32_t *)page;
    fill_page(scratch, expect_c, slot);
    const uint32_t *want = (const uint32_t *)scratch;
    for (uint32_t i = 0; i < PAGE_WORDS; i++) {
        if (got[i] != want[i]) {
            report_mismatch(slot, expect_c, got, i * 4u);
            return;
        }
    }
}

/* ---- disk ---- */
static inline void insw(uint16_t port, void *dst, uint32_t words)
{
    __asm__ volatile("cld; rep insw" : "+D"(dst), "+c"(words) : "d"(port) : "memory");
}

static inline void outsw(uint16_t port, const void *src, uint32_t words)
{
    __asm__ volatile("cld; rep outsw" : "+S"(src), "+c"(words) : "d"(port) : "memory");
}

/* Waits until the drive is not busy; returns the status, 0xff on a timeout. */
static uint8_t ata_wait(uint32_t want)
{
    for (uint32_t spins = 0; spins < 100000000u; spins++) {
        uint8_t st = inb(ATA_CMD);
        if (st & ATA_BSY)
            continue;
        if (st & (ATA_ERR | ATA_DF))
            return st;
        if ((st & want) == want)
            return st;
    }
    return 0xff;
}

/* One LBA28 PIO command of `count` sectors at `lba`; returns 0 when it succeeded. */
static int ata_rw(uint32_t lba, uint32_t count, uint8_t *buf, int write)
{
    if (ata_wait(0) & (ATA_ERR | ATA_DF | ATA_BSY))
        return -1;
    outb(ATA_DRIVE, (uint8_t)(0xE0u | ((lba >> 24) & 0x0Fu)));
    outb(ATA_COUNT, (uint8_t)count);
    outb(ATA_LBA0, (uint8_t)lba);
    outb(ATA_LBA1, (uint8_t)(lba >> 8));
    outb(ATA_LBA2, (uint8_t)(lba >> 16));
    outb(ATA_CMD, write ? 0x30 : 0x20);
    for (uint32_t i = 0; i < count; i++) {
        uint8_t st = ata_wait(ATA_DRQ);
        if (st & (ATA_ERR | ATA_DF) || st == 0xff)
            return -1;
        if (write)
            outsw(ATA_DATA, buf + i * 512u, 256);
        else
            insw(ATA_DATA, buf + i * 512u, 256);
    }
    /* a write is on the disk (in QEMU's block layer) once BSY and DRQ are clear */
    uint8_t st = ata_wait(0);
    return (st & (ATA_ERR | ATA_DF | ATA_DRQ)) || st == 0xff ? -1 : 0;
}

static void fill_chunk(uint8_t *buf, uint64_t c, uint32_t slot)
{
    uint32_t *w = (uint32_t *)buf;
    uint32_t words = cfg_dchunk * 128u;
    w[0] = DISK_MAGIC;
    w[1] = slot;
    w[2] = (uint32_t)c;
    w[3] = (uint32_t)(c >> 32);
    uint32_t s = mix3((uint32_t)c, (uint32_t)(c >> 32), slot ^ 0x2d4b4944u) | 1u;
    for (uint32_t i = HDR_WORDS; i < words; i++)
        w[i] = xorshift32(&s);
}

static void disk_init(void)
{
    if (!cfg_dslots)
        return;
    outb(ATA_CTRL, 0x02); /* nIEN: we poll, no interrupts */
    outb(ATA_DRIVE, 0xE0);
    uint8_t st = inb(ATA_CMD);
    if (st == 0xff || st == 0) {
        kprintf("DIRTIER warning: no IDE disk on the primary bus (status 0x%x): disk "
                "writes off\n", st);
        cfg_dslots = 0;
        return;
    }
    disk_ok = 1;
}

/* Loop c's disk step: verify slot c mod S holds loop c - S's chunk, then overwrite it. */
static void disk_step(uint64_t c)
{
    uint32_t slot;
    udiv64_32(c, cfg_dslots, &slot);
    uint32_t lba = slot * cfg_dchunk;
    uint32_t bytes = cfg_dchunk * 512u;
    if (c >= cfg_dslots) {
        if (ata_rw(lba, cfg_dchunk, dbuf, 0)) {
            disk_errors = disk_errors + 1;
        } else {
            fill_chunk(dwant, c - cfg_dslots, slot);
            if (memcmp(dbuf, dwant, bytes) != 0) {
                disk_mismatches = disk_mismatches + 1;
                if (disk_reports < MAX_MISMATCH_REPORTS) {
                    const uint32_t *g = (const uint32_t *)dbuf;
                    disk_reports++;
                    kprintf("DMISMATCH slot=%u expect_counter=%llu got_magic=0x%08x "
                            "got_slot=%u got_counter=%llu\n", slot, c - cfg_dslots, g[0],
                            g[1], ((uint64_t)g[3] << 32) | g[2]);
                }
            }
        }
    }
    fill_chunk(dbuf, c, slot);
    if (ata_rw(lba, cfg_dchunk, dbuf, 1))
        disk_errors = disk_errors + 1;
}

/* ---- command line ---- */
static int parse_u32(const char *s, size_t len, uint32_t *out)
{
    uint64_t v = 0;
    if (len == 0 || len > 10)
        return 0;
    for (size_t i = 0; i < len; i++) {
        if (s[i] < '0' || s[i] > '9')
            return 0;
        v = v * 10 + (uint32_t)(s[i] - '0');
    }
    if (v > 0xffffffffu)
        return 0;
    *out = (uint32_t)v;
    return 1;
}

static int key_is(const char *tok, size_t klen, const char *key)
{
    size_t n = strlen(key);
    return n == klen && memcmp(tok, key, n) == 0;
}

static void print_token(const char *tok, size_t len)
{
    for (size_t i = 0; i < len; i++)
        serial_putc(tok[i]);
}

static void set_u32(const char *tok, size_t klen, size_t len, uint32_t lo, uint32_t hi,
                    uint32_t *dst)
{
    uint32_t v;
    if (parse_u32(tok + klen + 1, len - klen - 1, &v) && v >= lo && v <= hi) {
        *dst = v;
        return;
    }
    kprintf("DIRTIER warning: bad value in '");
    print_token(tok, len);
    kprintf("' (want %u..%u), keeping %u\n", lo, hi, *dst);
}

static void parse_cmdline(const char *cl)
{
    const char *p = cl;
    int first = 1;
    while (*p) {
        while (*p == ' ' || *p == '\t')
            p++;
        if (!*p)
            break;
        const char *tok = p;
        while (*p && *p != ' ' && *p != '\t')
            p++;
        size_t len = (size_t)(p - tok);
        size_t klen = 0;
        while (klen < len && tok[klen] != '=')
            klen++;
        int is_first = first;
        first = 0;
        if (klen == len)
            continue; /* no '=': e.g. the kernel path QEMU puts first */
        if (key_is(tok, klen, "pages")) {
            set_u32(tok, klen, len, 1, 65536, &cfg_pages);
        } else if (key_is(tok, klen, "region")) {
            set_u32(tok, klen, len, 1, 3584, &cfg_region_mib);
        } else if (key_is(tok, klen, "delay")) {
            set_u32(tok, klen, len, 0, 10000000, &cfg_delay_us);
        } else if (key_is(tok, klen, "print")) {
            set_u32(tok, klen, len, 0, 3600000, &cfg_print_ms);
        } else if (key_is(tok, klen, "dslots")) {
            set_u32(tok, klen, len, 0, 1u << 20, &cfg_dslots);
        } else if (key_is(tok, klen, "dchunk")) {
            set_u32(tok, klen, len, 1, MAX_DCHUNK, &cfg_dchunk);
        } else if (key_is(tok, klen, "pattern")) {
            const char *v = tok + klen + 1;
            size_t vlen = len - klen - 1;
            int found = 0;
            for (uint32_t i = 0; i < 3; i++) {
                if (key_is(v, vlen, pattern_names[i])) {
                    cfg_pattern = (enum pattern)i;
                    found = 1;
                }
            }
            if (!found) {
                kprintf("DIRTIER warning: bad value in '");
                print_token(tok, len);
                kprintf("' (want repeat|text|random), keeping %s\n", pattern_names[cfg_pattern]);
            }
        } else if (!is_first) {
            kprintf("DIRTIER warning: unknown parameter '");
            print_token(tok, len);
            kprintf("' ignored\n");
        }
    }
}

/* ---- timing ---- */
/* TSC ticks during `ms` milliseconds of PIT channel 2 (one-shot, gate via port 0x61);
   0 if the PIT never reached terminal count. */
static uint64_t tsc_ticks_per_pit(uint32_t ms)
{
    uint32_t latch = PIT_HZ / 1000u * ms;
    uint8_t v = inb(0x61);
    outb(0x61, (uint8_t)((v & ~0x02u) | 0x01u)); /* speaker off, gate on */
    outb(0x43, 0xB0);                             /* ch2, lo/hi byte, mode 0, binary */
    outb(0x42, (uint8_t)(latch & 0xff));
    outb(0x42, (uint8_t)(latch >> 8));
    uint64_t t0 = rdtsc();
    uint32_t spins = 0;
    while ((inb(0x61) & 0x20) == 0) {
        if (++spins > 50000000u)
            return 0;
    }
    uint64_t t1 = rdtsc();
    return t1 - t0;
}

static uint32_t calibrate_tsc_khz(void)
{
    uint64_t best = 0;
    /* The shortest of three runs: host preemption only ever lengthens a run. */
    for (int i = 0; i < 3; i++) {
        uint64_t t = tsc_ticks_per_pit(CAL_MS);
        if (t && (best == 0 || t < best))
            best = t;
    }
    uint64_t khz = udiv64_32(best, CAL_MS, NULL);
    if (khz < 1000u || khz > 0xffffffffu) {
        kprintf("DIRTIER warning: TSC calibration against the PIT failed, assuming 1 GHz\n");
        return 1000000u;
    }
    return (uint32_t)khz;
}

/* Busy-waits `ticks` TSC ticks. A TSC that jumps (pause, migration) only ends the wait
   early or late once; the loop never depends on wall-clock continuity otherwise. */
static void tsc_wait(uint64_t ticks)
{
    uint64_t start = rdtsc();
    for (;;) {
        uint64_t now = rdtsc();
        if (now < start || now - start >= ticks)
            return;
        cpu_relax();
    }
}

/* ---- exceptions ---- */
struct idt_entry {
    uint16_t off_lo;
    uint16_t sel;
    uint8_t zero;
    uint8_t type;
    uint16_t off_hi;
} __attribute__((packed));

static struct idt_entry idt[32] __attribute__((aligned(8)));
extern const uint32_t isr_table[32];

static void idt_init(void)
{
    for (int i = 0; i < 32; i++) {
        idt[i].off_lo = (uint16_t)(isr_table[i] & 0xffff);
        idt[i].sel = 0x08;
        idt[i].zero = 0;
        idt[i].type = 0x8E; /* present, ring 0, 32-bit interrupt gate */
        idt[i].off_hi = (uint16_t)(isr_table[i] >> 16);
    }
    struct {
        uint16_t limit;
        uint32_t base;
    } __attribute__((packed)) desc = {sizeof idt - 1, (uint32_t)(uintptr_t)idt};
    __asm__ volatile("lidt %0" : : "m"(desc));
}

void fault_handler(struct fault_frame *f);
void fault_handler(struct fault_frame *f)
{
    if (f->vector == 2) /* NMI: nothing to do, carry on */
        return;
    kprintf("DIRTIER fault vec=%u err=0x%x eip=0x%x counter=%llu\n", f->vector, f->error,
            f->eip, (uint64_t)loop_counter);
    for (;;)
        __asm__ volatile("cli; hlt");
}

/* ---- main ---- */
static void halt_forever(void)
{
    for (;;)
        __asm__ volatile("cli; hlt");
}

void kmain(uint32_t magic, const struct multiboot_info *mbi);
void kmain(uint32_t magic, const struct multiboot_info *mbi)
{
    serial_init();
    idt_init();

    uint32_t mem_upper_kib = 31u * 1024u; /* assumed when the loader tells nothing */
    if (magic != MB_BOOT_MAGIC) {
        kprintf("DIRTIER warning: not booted by a multiboot loader (eax=0x%x), "
                "assuming 32 MiB and defaults\n", magic);
    } else {
        if (mbi->flags & MB_INFO_CMDLINE) {
            const char *cl = (const char *)(uintptr_t)mbi->cmdline;
            size_t n = 0;
            while (cl[n] && n < sizeof cmdline_copy - 1) {
                cmdline_copy[n] = cl[n];
                n++;
            }
            cmdline_copy[n] = '\0';
        }
        if (mbi->flags & MB_INFO_MEMORY)
            mem_upper_kib = mbi->mem_upper;
        else
            kprintf("DIRTIER warning: no memory size from the loader, assuming 32 MiB\n");
    }
    parse_cmdline(cmdline_copy);

    /* The region runs from 8 MiB up; it must end below the top of upper memory. */
    uint64_t mem_top = 0x100000ull + (uint64_t)mem_upper_kib * 1024u;
    uint32_t avail_pages = mem_top > REGION_BASE
                               ? (uint32_t)((mem_top - REGION_BASE) / PAGE_SIZE) : 0;
    uint32_t want_pages = cfg_region_mib * (1024u * 1024u / PAGE_SIZE);
    if (want_pages > avail_pages) {
        kprintf("DIRTIER warning: region=%u MiB does not fit above 8 MiB in mem_upper=%u KiB; "
                "clamped to %u pages\n", cfg_region_mib, mem_upper_kib, avail_pages);
        want_pages = avail_pages;
    }
    if (cfg_pages > want_pages) {
        if (want_pages == 0) {
            kprintf("DIRTIER error: no memory above 8 MiB (mem_upper=%u KiB); halting\n",
                    mem_upper_kib);
            halt_forever();
        }
        kprintf("DIRTIER warning: pages=%u exceeds the region's %u pages; using %u\n",
                cfg_pages, want_pages, want_pages);
        cfg_pages = want_pages;
    }
    uint32_t region_mib_eff = (want_pages + 255u) / 256u; /* as clamped, before rounding */
    region_slots = want_pages - want_pages % cfg_pages; /* a multiple of N */
    region_blocks = region_slots / cfg_pages;
    region = (uint8_t *)(uintptr_t)REGION_BASE;

    if (cfg_pattern == PAT_TEXT)
        build_corpus();

    tsc_khz = calibrate_tsc_khz();
    delay_ticks = (uint64_t)cfg_delay_us * tsc_khz / 1000u;
    print_ticks = (uint64_t)cfg_print_ms * tsc_khz;

    disk_init();

    kprintf("DIRTIER start pages=%u region=%u delay=%u pattern=%s mem=%u print=%u slots=%u "
            "base=0x%x tsc_khz=%u dslots=%u dchunk=%u\n",
            cfg_pages, region_mib_eff, cfg_delay_us,
            pattern_names[cfg_pattern], (uint32_t)(mem_top >> 20), cfg_print_ms,
            region_slots, REGION_BASE, tsc_khz, cfg_dslots, cfg_dchunk);

    uint64_t last_print = 0;
    int printed = 0;
    for (;;) {
        uint64_t c = loop_counter;
        uint32_t block;
        udiv64_32(c, region_blocks, &block);
        uint32_t first = block * cfg_pages;
        for (uint32_t i = 0; i < cfg_pages; i++) {
            uint32_t slot = first + i;
            uint8_t *page = region + (size_t)slot * PAGE_SIZE;
            if (c >= region_blocks)
                verify_page(page, c - region_blocks, slot);
            fill_page(page, c, slot);
        }
        if (disk_ok)
            disk_step(c);
        loop_counter = c + 1;

        uint64_t now = rdtsc();
        if (!printed || now < last_print || now - last_print >= print_ticks) {
            if (disk_ok)
                kprintf("COUNTER %llu mism=%llu dmism=%llu derr=%llu\n", (uint64_t)loop_counter,
                        (uint64_t)mismatches, (uint64_t)disk_mismatches, (uint64_t)disk_errors);
            else
                kprintf("COUNTER %llu mism=%llu\n", (uint64_t)loop_counter,
                        (uint64_t)mismatches);
            last_print = now;
            printed = 1;
        }
        if (delay_ticks)
            tsc_wait(delay_ticks);
    }
}
