/* dirtier: freestanding helpers (port I/O, COM1, formatted output, arithmetic). */
#ifndef DIRTIER_LIB_H
#define DIRTIER_LIB_H

#include <stddef.h>
#include <stdint.h>

static inline void outb(uint16_t port, uint8_t v)
{
    __asm__ volatile("outb %0, %1" : : "a"(v), "Nd"(port));
}

static inline uint8_t inb(uint16_t port)
{
    uint8_t v;
    __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port));
    return v;
}

static inline uint64_t rdtsc(void)
{
    uint32_t lo, hi;
    __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
    return ((uint64_t)hi << 32) | lo;
}

static inline void cpu_relax(void)
{
    __asm__ volatile("pause" ::: "memory");
}

/* n / d for a 64-bit n and a non-zero 32-bit d, with the remainder in *rem (may be NULL).
   Two divl instructions: no libgcc needed. */
static inline uint64_t udiv64_32(uint64_t n, uint32_t d, uint32_t *rem)
{
    uint32_t hi = (uint32_t)(n >> 32);
    uint32_t lo = (uint32_t)n;
    uint32_t qhi = hi / d;
    uint32_t r = hi % d;
    uint32_t qlo;
    __asm__("divl %4" : "=a"(qlo), "=d"(r) : "a"(lo), "d"(r), "rm"(d));
    if (rem)
        *rem = r;
    return ((uint64_t)qhi << 32) | qlo;
}

void *memcpy(void *dst, const void *src, size_t n);
void *memmove(void *dst, const void *src, size_t n);
void *memset(void *dst, int c, size_t n);
int memcmp(const void *a, const void *b, size_t n);
size_t strlen(const char *s);

void serial_init(void);
void serial_putc(char c);
void serial_puts(const char *s);

/* printf subset: %s %c %u %d %x %lu %llu %llx, field width and '0' flag, '%%'. Every '\n'
   goes out as "\r\n". */
void kprintf(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

#endif
