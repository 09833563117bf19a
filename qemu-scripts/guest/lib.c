/* dirtier: freestanding helpers (see lib.h). */
#include <stdarg.h>

#include "lib.h"

#define COM1 0x3f8

/* GCC may emit calls to these four even with -ffreestanding. */
/* Dword moves for the bulk: TCG runs `rep movsb` a byte per iteration. */
void *memcpy(void *dst, const void *src, size_t n)
{
    void *ret = dst;
    size_t words = n / 4, bytes = n % 4;
    __asm__ volatile("rep movsl" : "+D"(dst), "+S"(src), "+c"(words) : : "memory");
    __asm__ volatile("rep movsb" : "+D"(dst), "+S"(src), "+c"(bytes) : : "memory");
    return ret;
}

void *memmove(void *dst, const void *src, size_t n)
{
    unsigned char *d = dst;
    const unsigned char *s = src;
    if (d < s || d >= s + n)
        return memcpy(dst, src, n);
    while (n--)
        d[n] = s[n];
    return dst;
}

void *memset(void *dst, int c, size_t n)
{
    void *ret = dst;
    uint32_t v = (uint8_t)c * 0x01010101u;
    size_t words = n / 4, bytes = n % 4;
    __asm__ volatile("rep stosl" : "+D"(dst), "+c"(words) : "a"(v) : "memory");
    __asm__ volatile("rep stosb" : "+D"(dst), "+c"(bytes) : "a"(v) : "memory");
    return ret;
}

int memcmp(const void *a, const void *b, size_t n)
{
    const unsigned char *x = a, *y = b;
    for (size_t i = 0; i < n; i++)
        if (x[i] != y[i])
            return x[i] < y[i] ? -1 : 1;
    return 0;
}

size_t strlen(const char *s)
{
    size_t n = 0;
    while (s[n])
        n++;
    return n;
}

/* Fallbacks in case the compiler emits 64-bit division helpers (we link without libgcc). */
uint64_t __udivdi3(uint64_t n, uint64_t d);
uint64_t __umoddi3(uint64_t n, uint64_t d);

static uint64_t udivmod64(uint64_t n, uint64_t d, uint64_t *rem)
{
    uint64_t q = 0, r = 0;
    if (d == 0) {
        if (rem)
            *rem = 0;
        return ~(uint64_t)0;
    }
    if ((d >> 32) == 0) {
        uint32_t r32;
        q = udiv64_32(n, (uint32_t)d, &r32);
        if (rem)
            *rem = r32;
        return q;
    }
    for (int i = 63; i >= 0; i--) {
        r = (r << 1) | ((n >> i) & 1);
        if (r >= d) {
            r -= d;
            q |= (uint64_t)1 << i;
        }
    }
    if (rem)
        *rem = r;
    return q;
}

uint64_t __udivdi3(uint64_t n, uint64_t d)
{
    return udivmod64(n, d, NULL);
}

uint64_t __umoddi3(uint64_t n, uint64_t d)
{
    uint64_t r;
    udivmod64(n, d, &r);
    return r;
}

void serial_init(void)
{
    outb(COM1 + 1, 0x00); /* no interrupts */
    outb(COM1 + 3, 0x80); /* DLAB */
    outb(COM1 + 0, 0x01); /* divisor 1: 115200 baud */
    outb(COM1 + 1, 0x00);
    outb(COM1 + 3, 0x03); /* 8N1 */
    outb(COM1 + 2, 0xC7); /* FIFO on, cleared, 14-byte threshold */
    outb(COM1 + 4, 0x03); /* DTR, RTS; OUT2 off: no IRQ */
}

void serial_putc(char c)
{
    /* Bounded wait for an empty transmit holding register: never hang on a missing UART. */
    for (uint32_t spin = 0; spin < 1000000u; spin++) {
        if (inb(COM1 + 5) & 0x20)
            break;
        cpu_relax();
    }
    outb(COM1, (uint8_t)c);
}

void serial_puts(const char *s)
{
    while (*s) {
        if (*s == '\n')
            serial_putc('\r');
        serial_putc(*s++);
    }
}

static void put_padded(const char *digits, int len, int width, char pad)
{
    for (int i = len; i < width; i++)
        serial_putc(pad);
    for (int i = 0; i < len; i++)
        serial_putc(digits[i]);
}

static void put_uint(uint64_t v, uint32_t base, int width, char pad)
{
    char buf[24];
    int n = 0;
    do {
        uint32_t digit;
        v = udiv64_32(v, base, &digit);
        buf[sizeof buf - 1 - n] = (char)(digit < 10 ? '0' + digit : 'a' + digit - 10);
        n++;
    } while (v && n < (int)sizeof buf);
    put_padded(&buf[sizeof buf - n], n, width, pad);
}

void kprintf(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    for (const char *p = fmt; *p; p++) {
        if (*p != '%') {
            if (*p == '\n')
                serial_putc('\r');
            serial_putc(*p);
            continue;
        }
        p++;
        char pad = ' ';
        int width = 0;
        int longs = 0;
        if (*p == '0') {
            pad = '0';
            p++;
        }
        while (*p >= '0' && *p <= '9')
            width = width * 10 + (*p++ - '0');
        while (*p == 'l') {
            longs++;
            p++;
        }
        switch (*p) {
        case 's': {
            const char *s = va_arg(ap, const char *);
            put_padded(s, (int)strlen(s), width, ' ');
            break;
        }
        case 'c':
            serial_putc((char)va_arg(ap, int));
            break;
        case 'd': {
            int64_t v = longs >= 2 ? va_arg(ap, int64_t) : (int64_t)va_arg(ap, int32_t);
            if (v < 0) {
                serial_putc('-');
                v = -v;
            }
            put_uint((uint64_t)v, 10, width, pad);
            break;
        }
        case 'u':
        case 'x': {
            uint64_t v = longs >= 2 ? va_arg(ap, uint64_t) : (uint64_t)va_arg(ap, uint32_t);
            put_uint(v, *p == 'u' ? 10 : 16, width, pad);
            break;
        }
        case '%':
            serial_putc('%');
            break;
        case '\0':
            p--;
            break;
        default:
            serial_putc('%');
            serial_putc(*p);
            break;
        }
    }
    va_end(ap);
}
