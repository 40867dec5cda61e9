# Embeds SQL migrations as C strings: -DFILES=a.sql;b.sql -DOUT=file.c
# Defines `const struct store_migration store_migrations[]` and `store_migrations_count`,
# in file-name order; the version of a migration is the number its file name starts with.
set(out "/* Generated from the files in storage/migrations; do not edit. */\n#include <stddef.h>\n#include \"migrations.h\"\nconst struct store_migration store_migrations[] = {\n")
set(count 0)
foreach(f IN LISTS FILES)
  get_filename_component(name ${f} NAME)
  string(REGEX MATCH "^[0-9]+" ver ${name})
  math(EXPR ver "${ver} + 0")
  file(READ ${f} sql HEX)
  string(REGEX REPLACE "([0-9a-f][0-9a-f])" "\\\\x\\1" sql "${sql}")
  string(REGEX REPLACE "((\\\\x..){40})" "\\1\"\n\"" sql "${sql}")
  string(APPEND out "  {${ver}, \"${name}\",\n\"${sql}\"},\n")
  math(EXPR count "${count} + 1")
endforeach()
string(APPEND out "};\nconst size_t store_migrations_count = ${count};\n")
file(WRITE ${OUT} "${out}")
