module chimera.dev/tools/pause

go 1.23
